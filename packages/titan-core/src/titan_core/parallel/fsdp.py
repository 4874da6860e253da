"""FSDP2 / HSDP wrapping shared by every model family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from titan_core.parallel.expert_parallel import is_expert_parallel


@dataclass(frozen=True)
class ExpertsSharding:
    """How FSDP shards the expert-parallel routed experts, apart from everything else.

    Attributes:
        mesh: the ranks holding the same experts (``ParallelMesh.experts_fsdp_mesh``).
        grad_divide_factor: what their summed gradients are divided by
            (``ParallelDims.expert_grad_divide_factor``): the number of ranks the loss is
            averaged over, not the size of ``mesh``.
    """

    mesh: DeviceMesh
    grad_divide_factor: int


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
    pipelined: bool = False,
    experts: ExpertsSharding | None = None,
) -> None:
    """Shard each block of ``model.layers``, then the root (embeddings, final norm, output).

    Args:
        model: a model with a ``layers`` ModuleDict (the naming contract).
        mesh: 1-D mesh for FSDP, or 2-D (replicate, shard) for HSDP.
        param_dtype: dtype parameters are gathered and computed in.
        reduce_dtype: dtype of the gradient reduce-scatter/all-reduce.
        reshard_after_forward: ``always``, ``never``, or ``default`` (every block but the last,
            whose parameters backward needs right away; never under pipeline parallel, where
            each microbatch would gather every block again).
        pipelined: the model is a pipeline stage.
        experts: under expert parallel, the routed experts' own mesh: each expert-parallel
            experts module becomes its own FSDP group there, inside its block's group.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        if reshard_after_forward == "default":
            reshard = not pipelined and i < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        if experts is not None:
            for module in block.modules():
                if is_expert_parallel(module):
                    _shard_experts(module, experts, mp, reshard)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root group holds the embeddings (and a tied output), the final norm and output; its
    # forward ends the model, so keeping it gathered saves a re-gather at the start of backward.
    fully_shard(
        model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always"
    )


def _shard_experts(
    module: nn.Module, experts: ExpertsSharding, mp: MixedPrecisionPolicy, reshard: bool
) -> None:
    """One FSDP group for an expert-parallel experts module, on the experts' own mesh.

    NOTE: the weights are already DTensors sharded over ``ep``; FSDP shards them further over
    the experts' mesh (a 2-D layout, as with TP). Each expert's gradient arrives summed over
    its ``ep`` group by the all-to-all's backward, so the reduction over the experts' mesh must
    divide by the data-parallel size of the whole loss (dp_replicate x dp_shard x cp), not by
    the size of this mesh, to give the same mean as every other parameter.
    """
    fully_shard(module, mesh=experts.mesh, mp_policy=mp, reshard_after_forward=reshard)
    module.set_gradient_divide_factor(float(experts.grad_divide_factor))
    shard_size = experts.mesh.size(-1)
    if experts.mesh.device_type == "cpu" and shard_size > 1:
        # NOTE: a custom divide factor reduce-scatters with ReduceOp.PREMUL_SUM, which gloo
        # lacks; a plain sum then a division is the same. (Not with a 1-rank shard dimension:
        # there torch 2.13 divides in its copy and would divide again after.)
        module.set_force_sum_reduction_for_comms(True)

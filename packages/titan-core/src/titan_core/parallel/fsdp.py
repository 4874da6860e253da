"""FSDP2 / HSDP wrapping shared by every model family."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: str,
    pipelined: bool = False,
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
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        if reshard_after_forward == "default":
            reshard = not pipelined and i < len(blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # The root group holds the embeddings (and a tied output), the final norm and output; its
    # forward ends the model, so keeping it gathered saves a re-gather at the start of backward.
    fully_shard(
        model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always"
    )

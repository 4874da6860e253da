"""Tensor-parallel plan for multi-head latent attention (``titan_core.models.mla``).

Heads are split over the TP ranks, as in dense attention: the projections that produce per-head
tensors (``wq`` or ``wq_b``, and ``wkv_b``) are column-wise, the output projection ``wo``
row-wise. The projections into the latents (``wq_a``, ``wkv_a``) and the latent norms
(``q_norm``, ``kv_norm``) are small and feed every head, so their weights are replicated and
each rank computes them whole: sharding a rank-512 latent would only add a collective. The rope
key ``k_pe`` is shared by all heads; its gradient on each rank covers that rank's heads only and
is summed over the group (:class:`PartialGradOutput` on ``k_pe_heads``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import Shard


def _as_replicated_dtensor(x: Any, mesh: DeviceMesh) -> Any:
    if isinstance(x, DTensor) or not hasattr(x, "shape"):
        return x
    return DTensor.from_local(x, mesh, (Replicate(),), run_check=False)


class ReplicateParallel(ParallelStyle):
    """The module's weights replicated over the TP group, computed whole on every rank from a
    replicated input; the output is a local tensor. (A gradient that arrives as a partial sum,
    e.g. from a column-wise consumer, is summed over the group on its way back.)"""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                dist_param = nn.Parameter(distribute_tensor(param, mesh, [Replicate()]))
                mod.register_parameter(pname, dist_param)

        def inputs(mod: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            return (_as_replicated_dtensor(args[0], mesh), *args[1:])

        def outputs(mod: nn.Module, out: Any, mesh: DeviceMesh) -> Any:
            return out.to_local() if isinstance(out, DTensor) else out

        return distribute_module(module, device_mesh, replicate, inputs, outputs)


class PartialGradOutput(ParallelStyle):
    """A parameter-free module whose (local) output each rank uses for its own heads: its input
    is replicated and the gradient of its output is a partial sum, added over the group."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def inputs(mod: nn.Module, args: tuple, mesh: DeviceMesh) -> tuple:
            return (_as_replicated_dtensor(args[0], mesh), *args[1:])

        def outputs(mod: nn.Module, out: Any, mesh: DeviceMesh) -> Any:
            return out.to_local(grad_placements=(Partial(),))

        return distribute_module(module, device_mesh, None, inputs, outputs)


def mla_tp_plan() -> dict[str, ParallelStyle]:
    """Block plan entries for ``MultiHeadLatentAttention`` (beside the dense plan's
    ``attention`` input preparation, which gathers the sequence before attention)."""
    return {
        "attention.wq": ColwiseParallel(),
        "attention.wq_a": ReplicateParallel(),
        "attention.q_norm": ReplicateParallel(),
        "attention.wq_b": ColwiseParallel(),
        "attention.wkv_a": ReplicateParallel(),
        "attention.kv_norm": ReplicateParallel(),
        "attention.wkv_b": ColwiseParallel(),
        "attention.k_pe_heads": PartialGradOutput(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    }

"""Gradient-norm clipping over every parameter of every model part, whatever mesh each lives on
(FSDP, FSDP x TP, the routed experts' own expert-parallel mesh) and across pipeline stages."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate


@torch.no_grad()
def clip_grad_norm_(parts: list[nn.Module], max_norm: float, pp_mesh: DeviceMesh | None) -> Tensor:
    """Clip the gradients of all stages on all pipeline ranks by their global 2-norm.

    Args:
        parts: this rank's stage modules (parameters may be DTensors from FSDP/TP/EP, on
            different meshes).
        max_norm: the largest allowed total norm; ``inf`` only computes the norm.
        pp_mesh: the ``pp`` mesh to combine the ranks' norms over, or None for one rank.

    Returns:
        The total norm before clipping, a plain scalar tensor, equal on every rank.
    """
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    device = next((p.device for part in parts for p in part.parameters()), torch.device("cpu"))
    total_sq = sum_of_squares(grads, device)
    if pp_mesh is not None and pp_mesh.size() > 1:
        # NOTE: combined by hand: each rank's norm comes from its own meshes, and stacking
        # DTensors of different meshes (what torch's clip_grad_norm_ would do) fails.
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    total = total_sq.sqrt().float()
    if math.isfinite(max_norm) and grads:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    """The squared 2-norm of all ``grads`` together, in float64, equal on every rank of a stage.

    Each rank sums the squares of its own shards, grouped by layout (mesh, and which mesh
    dimensions shard the tensor); each group is then summed over its sharded dimensions only, one
    all-reduce per group, not per tensor. A mesh dimension that replicates a tensor (TP's
    replicated norms, the router under TP) holds the same values on every rank and is not summed.

    NOTE: squares are summed in float64. A float32 norm of millions of gradient entries is off by
    ~1e-4 relative, and by a different amount under each layout (the sums are split differently),
    so the logged norm and the clipping factor would differ between layouts.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_layout: dict[tuple[DeviceMesh, tuple[bool, ...]], Tensor] = {}
    for grad in grads:
        if not isinstance(grad, DTensor):
            total += torch.linalg.vector_norm(grad, 2, dtype=torch.float64).to(device) ** 2
            continue
        if any(p.is_partial() for p in grad.placements):
            # Never left by backward (FSDP and TP reduce gradients); exact if it ever is.
            norm = torch.linalg.vector_norm(grad, 2, dtype=torch.float64).full_tensor()
            total += norm.to(device) ** 2
            continue
        # _StridedShard (FSDP over a TP-sharded dim) is neither replicate nor partial: sharded.
        key = (grad.device_mesh, tuple(not p.is_replicate() for p in grad.placements))
        local = torch.linalg.vector_norm(grad.to_local(), 2, dtype=torch.float64) ** 2
        by_layout[key] = by_layout[key] + local if key in by_layout else local
    for (mesh, sharded), local_sq in by_layout.items():
        placements = [Partial() if s else Replicate() for s in sharded]
        summed = DTensor.from_local(local_sq, mesh, placements, run_check=False).full_tensor()
        total += summed.to(device)
    return total

"""Gradient-norm clipping over every parameter of every model part, across pipeline stages."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parts: list[nn.Module], max_norm: float, pp_mesh: DeviceMesh | None) -> Tensor:
    """Clip the gradients of all stages on all pipeline ranks by their global 2-norm.

    Args:
        parts: this rank's stage modules (parameters may be DTensors from FSDP/TP).
        max_norm: the largest allowed total norm; ``inf`` only computes the norm.
        pp_mesh: the ``pp`` mesh to combine the ranks' norms over, or None for one rank.

    Returns:
        The total norm before clipping, a plain scalar tensor, equal on every pipeline rank.
    """
    groups = _grads_by_mesh(parts)
    device = next((p.device for part in parts for p in part.parameters()), torch.device("cpu"))
    # NOTE: squares are summed in float64. A float32 norm of millions of gradient entries is
    # off by ~1e-4 relative, and by a different amount under each layout (the sums are split
    # differently), so the logged norm and the clipping factor would differ between layouts.
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for grads in groups.values():
        for grad in grads:
            norm = torch.linalg.vector_norm(grad, 2, dtype=torch.float64)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
            total_sq = total_sq + norm.to(device) ** 2
    if pp_mesh is not None and pp_mesh.size() > 1:
        # NOTE: combined by hand: each rank's norm comes from its own meshes, and stacking
        # DTensors of different meshes (what torch's clip_grad_norm_ would do) fails.
        dist.all_reduce(total_sq, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    total = total_sq.sqrt().float()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grads in groups.values():
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total


def _grads_by_mesh(parts: list[nn.Module]) -> dict[Any, list[Tensor]]:
    """Gradients grouped by DTensor mesh (None for plain tensors): norms combine per group."""
    groups: dict[Any, list[Tensor]] = {}
    for part in parts:
        for p in part.parameters():
            if p.grad is not None:
                mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
                groups.setdefault(mesh, []).append(p.grad)
    return groups

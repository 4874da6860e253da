"""Gradient-norm clipping over every parameter of every model part, across pipeline stages."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def _squared_norm(part: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in part.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    # A DTensor norm (FSDP/TP parameters) is a partial value: full_tensor() reduces it.
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norm.float() ** 2


def clip_grad_norm_(
    parts: list[nn.Module], max_norm: float, pp_mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Clip to the global 2-norm over all parts on all pipeline ranks; return that norm.

    Args:
        parts: this rank's model parts (the whole model, or its pipeline stages).
        max_norm: the threshold; ``inf`` only measures.
        pp_mesh: the pipeline mesh whose ranks hold the other stages, or None.
    """
    # NOTE: norms are combined as sums of squares: parameters of different stages live on
    # different meshes, and torch cannot stack DTensors across meshes.
    total_sq = sum(_squared_norm(part) for part in parts)
    device = next(p.device for part in parts for p in part.parameters())
    total_sq = torch.as_tensor(total_sq, device=device)
    if pp_mesh is not None:
        dist.all_reduce(total_sq, group=pp_mesh.get_group())
    total = total_sq.sqrt()
    grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total

"""A forward-only pass through pipeline stages, for the schedules torch cannot run forward only.

torch's V schedules (ZBVZeroBubble, DualPipeV) pair every forward with a backward in their
action lists, so ``schedule.eval()`` fails on them. Validation then runs the stages itself:
microbatch after microbatch, stage after stage, the rank holding stage ``s`` receives its input
from the rank holding stage ``s - 1`` (unless it holds both), runs the stage, and sends the
output on. Microbatches do not overlap, so this is slower than a schedule by the pipeline's
bubbles; it is used for validation only. Each activation's dtype and shape travel ahead of it,
so any batch shape works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

# dtypes an activation between stages may have, by their code in the header
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_DIMS = 4


def stagewise_eval_losses(
    parts: dict[int, nn.Module],
    placement: dict[int, int],
    group: dist.ProcessGroup,
    inputs: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    n_microbatches: int,
) -> list[Tensor]:
    """Each microbatch's mean loss, on the rank holding the last stage (``[]`` elsewhere).

    Args:
        parts: this rank's stage modules by stage id.
        placement: stage id -> the rank in ``group`` that holds it, for every stage.
        group: the pipeline process group.
        inputs: token ids (B, S); read by the holder of stage 0.
        labels: target ids (B, S); read by the holder of the last stage.
        loss_fn: ``(logits, labels) -> mean loss`` of one microbatch.
        n_microbatches: the batch is split into this many, as a schedule splits it.
    """
    me = dist.get_rank(group)
    last = len(placement) - 1
    losses: list[Tensor] = []
    for x, y in zip(
        inputs.tensor_split(n_microbatches), labels.tensor_split(n_microbatches), strict=True
    ):
        h = x
        for s in sorted(parts):
            if s > 0 and placement[s - 1] != me:
                h = _receive(placement[s - 1], group, inputs.device)
            h = parts[s](h)
            if s == last:
                losses.append(loss_fn(h, y).detach())
            elif placement[s + 1] != me:
                _send(h, placement[s + 1], group)
    return losses


def _send(t: Tensor, to: int, group: dist.ProcessGroup) -> None:
    if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
        raise ValueError(f"cannot send a stage output of shape {tuple(t.shape)}, {t.dtype}")
    shape = [*t.shape] + [0] * (_MAX_DIMS - t.dim())
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *shape], device=t.device)
    dst = dist.get_global_rank(group, to)
    dist.send(header, dst, group=group)
    dist.send(t.contiguous(), dst, group=group)


def _receive(source: int, group: dist.ProcessGroup, device: torch.device) -> Tensor:
    src = dist.get_global_rank(group, source)
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    code, ndim, *shape = header.tolist()
    t = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=device)
    dist.recv(t, src, group=group)
    return t

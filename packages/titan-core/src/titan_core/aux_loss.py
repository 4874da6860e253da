"""Extra loss terms a model part contributes (``TrainSpec.aux_loss_fn``), under every layout.

Without pipeline parallel the trainer back-propagates ``loss + aux`` itself. A pipeline schedule
runs forward and backward on its own and calls the loss only on the last stage, so each stage's
term is attached to that stage's output instead: :class:`AddAuxiliaryLoss` passes the output
through unchanged and, in backward, gives the term the gradient the loss's scale would (the
schedule's ``loss_scale / n_microbatches``). Every stage thus adds its own layers' term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class AddAuxiliaryLoss(torch.autograd.Function):
    """``forward(x, aux, scale) = x``; backward also sends ``scale`` into ``aux``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device, aux.requires_grad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        dtype, device, needs_grad = ctx.aux_meta
        aux_grad = torch.full((), ctx.scale, dtype=dtype, device=device) if needs_grad else None
        return grad, aux_grad, None


def attach_to_stages(
    parts: list[nn.Module], aux_loss_fn: Callable[[nn.Module], Any], scale: Callable[[], float]
) -> None:
    """Make each pipeline stage's output carry its auxiliary loss into backward.

    Args:
        parts: this rank's stage modules.
        aux_loss_fn: ``TrainSpec.aux_loss_fn``; None from it means no term for that call.
        scale: the current gradient scale of one microbatch's loss, read at each forward.
    """

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        aux = aux_loss_fn(module)
        if aux is None or not torch.is_grad_enabled():
            return output
        return AddAuxiliaryLoss.apply(output, aux, scale())

    for part in parts:
        part.register_forward_hook(hook)

"""Optimizer and learning-rate schedule from ``[optimizer]`` and ``[lr_scheduler]``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from titan_core.config.job_config import LRScheduler, Optimizer
from titan_core.errors import UserError

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}


def check_optimizer(cfg: Optimizer) -> None:
    """The [optimizer] keys that the config's bounds cannot express."""
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"optimizer.name: '{cfg.name}' is not one of {', '.join(OPTIMIZERS)}")
    if cfg.lr <= 0:
        raise UserError(f"optimizer.lr={cfg.lr}: the learning rate must be > 0")


def build_optimizer(parts: list[nn.Module], cfg: Optimizer) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or Adam over every trainable parameter of the model parts."""
    check_optimizer(cfg)
    style = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "for-loop": {"foreach": False},
    }[cfg.implementation]
    params = [p for part in parts for p in part.parameters() if p.requires_grad]
    return OPTIMIZERS[cfg.name](
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        **style,
    )


def lr_factor(step: int, cfg: LRScheduler, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (1-based).

    Linear warmup over ``warmup_steps`` (step 1 gets ``1/warmup_steps``), a constant phase, then
    a decay over the last ``decay_ratio`` of the post-warmup steps (all of them when unset) down
    to ``min_lr_factor``: linear, cosine or ``1 - sqrt(progress)``.
    """
    warmup = cfg.warmup_steps
    if step <= warmup:
        return step / warmup
    after = max(total_steps - warmup, 1)
    ratio = 1.0 if cfg.decay_ratio is None else cfg.decay_ratio
    decay_steps = max(round(after * ratio), 1)
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return 1.0
    progress = min((step - decay_start) / decay_steps, 1.0)
    shape = {
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        "sqrt": 1.0 - math.sqrt(progress),
    }[cfg.decay_type]
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def validate_lr_scheduler(cfg: LRScheduler, total_steps: int) -> None:
    if cfg.warmup_steps < 0:
        raise UserError(f"lr_scheduler.warmup_steps={cfg.warmup_steps}: must be >= 0")
    if cfg.decay_ratio is not None and not 0.0 <= cfg.decay_ratio <= 1.0:
        raise UserError(f"lr_scheduler.decay_ratio={cfg.decay_ratio}: must be in [0, 1]")
    if not 0.0 <= cfg.min_lr_factor <= 1.0:
        raise UserError(f"lr_scheduler.min_lr_factor={cfg.min_lr_factor}: must be in [0, 1]")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int
) -> LambdaLR:
    """A LambdaLR whose epoch counter is the number of optimizer steps taken.

    LambdaLR calls the lambda with 0 before the first step; we shift by one so that optimizer
    step ``s`` (1-based) runs with ``lr * lr_factor(s)``.
    """
    validate_lr_scheduler(cfg, total_steps)
    return LambdaLR(optimizer, lambda taken: lr_factor(taken + 1, cfg, total_steps))

"""Checks of the job's own numbers that run before anything is built or written.

The trainer calls these first; ``titan-plan``-style tools and tests can call them alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from titan_core.config import JobConfig
from titan_core.errors import UserError
from titan_core.parallel import ParallelDims
from titan_core.parallel.activation_checkpoint import parse_every_n
from titan_core.train_spec import TrainSpec


def resolve_model_args(spec: TrainSpec, config: JobConfig) -> Any:
    """The flavor's args, with the RoPE table sized for ``training.seq_len``."""
    if config.model.flavor not in spec.flavors:
        raise UserError(
            f"model.flavor: '{config.model.flavor}' is not a flavor of {spec.name} "
            f"(flavors: {', '.join(spec.flavors)})"
        )
    args = spec.flavors[config.model.flavor]
    if hasattr(args, "max_seq_len"):
        args = dataclasses.replace(args, max_seq_len=config.training.seq_len)
    return args


def validate_training(config: JobConfig, dims: ParallelDims) -> int:
    """Check the [training] numbers against the layout; return the global batch size."""
    t = config.training
    for key in ("steps", "seq_len", "local_batch_size"):
        if getattr(t, key) < 1:
            raise UserError(f"training.{key}={getattr(t, key)}: must be >= 1")
    if config.metrics.log_freq < 1:
        raise UserError(f"metrics.log_freq={config.metrics.log_freq}: must be >= 1")
    if config.checkpoint.create_seed_checkpoint and dims.world_size != 1:
        raise UserError(
            "checkpoint.create_seed_checkpoint: run it in one process (the weights are written "
            f"whole), not under {dims.world_size} ranks; drop torchrun for this step"
        )
    if config.checkpoint.interval < 1:
        raise UserError(f"checkpoint.interval={config.checkpoint.interval}: must be >= 1")
    if config.activation_checkpoint.mode == "selective":
        parse_every_n(config.activation_checkpoint.selective_ac_option)
    unknown = set(config.compile.components) - {"model", "loss"}
    if unknown:
        raise UserError(
            f"compile.components: unknown {sorted(unknown)}; use model and/or loss "
            "(e.g. --compile.components model,loss)"
        )
    per_step = t.local_batch_size * dims.dp
    global_batch = per_step if t.global_batch_size == -1 else t.global_batch_size
    if global_batch < 1 or global_batch % per_step:
        raise UserError(
            f"training.global_batch_size={t.global_batch_size} must be a positive multiple of "
            f"training.local_batch_size x data-parallel degree = {t.local_batch_size} x {dims.dp}"
            f" = {per_step} (or -1)"
        )
    return global_batch

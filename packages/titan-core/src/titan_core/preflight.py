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
    return training_args(flavor_args(spec, config), config.training.seq_len)


def flavor_args(spec: TrainSpec, config: JobConfig) -> Any:
    """The args of ``model.flavor`` as the family defines them (its real positions)."""
    if config.model.flavor not in spec.flavors:
        raise UserError(
            f"model.flavor: '{config.model.flavor}' is not a flavor of {spec.name} "
            f"(flavors: {', '.join(spec.flavors)})"
        )
    return spec.flavors[config.model.flavor]


def training_args(args: Any, seq_len: int) -> Any:
    """``args`` with the RoPE table sized for ``seq_len``: training needs no more rows."""
    if hasattr(args, "max_seq_len"):
        args = dataclasses.replace(args, max_seq_len=seq_len)
    return args


def architecture_positions(args: Any, seq_len: int) -> int | None:
    """How many positions the model built from ``args`` (a flavor's or an HF config's) handles
    once trained on ``seq_len``-token sequences: what checkpoints record and exports write as
    ``max_position_embeddings``. None for args without ``max_seq_len``."""
    positions = getattr(args, "max_seq_len", None)
    return None if positions is None else max(positions, seq_len)


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

"""Activation checkpointing of transformer blocks: full, every N-th block, or per op."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from titan_core.config.job_config import ActivationCheckpoint
from titan_core.errors import UserError

# Ops whose outputs `op` mode keeps: the matmuls and attention, the expensive ones to recompute,
# and expert parallel's token all-to-alls (recomputing them would communicate again).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops._c10d_functional.all_to_all_single.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_attention_math.default,
}


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _op_context():
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def parse_every_n(option: str) -> int | None:
    """The N of ``selective_ac_option`` when it is an integer, None for ``op``."""
    if option == "op":
        return None
    try:
        every = int(option)
    except ValueError:
        every = 0
    if every < 1:
        raise UserError(
            f"activation_checkpoint.selective_ac_option='{option}': expected a positive integer "
            "N (checkpoint every N-th block) or 'op'"
        )
    return every


def apply_activation_checkpointing(model: nn.Module, cfg: ActivationCheckpoint) -> None:
    """Wrap blocks of ``model.layers`` in place; names stay the same in the state dict.

    Args:
        model: a model with a ``layers`` ModuleDict.
        cfg: ``mode`` none / full / selective, and ``selective_ac_option`` N or ``op``.
    """
    if cfg.mode == "none":
        return
    every = parse_every_n(cfg.selective_ac_option) if cfg.mode == "selective" else 1
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if every is None:
            wrapped = checkpoint_wrapper(block, context_fn=_op_context, preserve_rng_state=False)
        elif (i + 1) % every == 0:  # every N-th block, counting from the first
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        model.layers.register_module(name, wrapped)

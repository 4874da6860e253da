"""``[debug]`` (torchtitan's spelling) folded into ``[training]`` and the MoE args, and
determinism switched on.

After :func:`resolve_debug` the rest of titan reads ``training.seed`` and
``training.deterministic`` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from titan_core.errors import UserError


def resolve_debug(config: Any) -> None:
    """Copy ``debug.seed`` / ``debug.deterministic`` into ``[training]``; refuse a conflict.

    NOTE: ``training.seed`` at its default (0) and a ``False`` deterministic flag count as
    unset: a TOML file cannot be told apart from the default once it is parsed.
    """
    d, t = config.debug, config.training
    if d.seed is not None:
        if t.seed not in (0, d.seed):
            raise UserError(
                f"debug.seed={d.seed} and training.seed={t.seed} disagree; set only one of them"
            )
        t.seed = d.seed
    if d.deterministic or d.deterministic_warn_only:
        t.deterministic = True


def set_determinism(config: Any) -> None:
    """Deterministic algorithms for ``training.deterministic``; only warnings with
    ``debug.deterministic_warn_only``."""
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=config.debug.deterministic_warn_only)


def apply_moe_debug(model_args: Any, config: Any) -> Any:
    """``debug.moe_force_load_balance`` set on the model's MoE args (refused without experts)."""
    if not config.debug.moe_force_load_balance:
        return model_args
    moe = getattr(model_args, "moe", None)
    if moe is None:
        raise UserError(
            f"debug.moe_force_load_balance: {config.model.name} {config.model.flavor} has no "
            "experts to balance; turn it off or pick an MoE flavor"
        )
    return dataclasses.replace(model_args, moe=dataclasses.replace(moe, force_load_balance=True))

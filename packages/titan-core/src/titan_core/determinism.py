"""``[debug]`` (torchtitan's spelling) folded into ``[training]``, and determinism switched on.

After :func:`resolve_debug` the rest of titan reads ``training.seed`` and
``training.deterministic`` only.
"""

from __future__ import annotations

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

"""Which ``nn.Linear`` layers a low-precision converter takes, and why it leaves the others.

A layer is skipped when its name contains one of the ``filter_fqns`` entries, when a dimension is
not a multiple of 16 (the float8/MX matmul kernels need that), or, with the
``auto_filter_small_kn`` entry, when it is too small to gain: float8's casts cost more than its
faster matmul saves. The size thresholds follow torchao's published H100 measurements for each
recipe (tensorwise gains once K > 4096 or N > 1024; rowwise needs N > 2048, K > 1024 and not
both N <= 4096 and K <= 2048) and are heuristics, not guarantees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

AUTO_FILTER = "auto_filter_small_kn"


def _too_small(recipe: str, n: int, k: int) -> bool:
    """Whether an (N out, K in) matmul is below the size where ``recipe`` pays off."""
    if recipe == "tensorwise":
        return k <= 4096 and n <= 1024
    return n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)


@dataclass
class LinearSelection:
    """The outcome of filtering: converted layer names, and skipped names with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self, what: str) -> str:
        """``float8 tensorwise: converted 14 Linear layers; skipped output (filter_fqns)``."""
        text = f"{what}: converted {len(self.converted)} Linear layers"
        if self.skipped:
            reasons = ", ".join(f"{name} ({why})" for name, why in self.skipped.items())
            text += f"; skipped {len(self.skipped)}: {reasons}"
        return text


class LinearFilter:
    """``filter(module, fqn)`` for torchao's ``module_filter_fn``, recording each decision.

    Args:
        filter_fqns: name fragments to skip; ``auto_filter_small_kn`` turns on the size filter.
        recipe: the recipe whose size thresholds apply (tensorwise or a rowwise one).
    """

    def __init__(self, filter_fqns: list[str], recipe: str = "tensorwise") -> None:
        self.fragments = [f for f in filter_fqns if f != AUTO_FILTER]
        self.auto = AUTO_FILTER in filter_fqns
        self.recipe = recipe
        self.selection = LinearSelection()

    def reason_to_skip(self, module: nn.Linear, fqn: str) -> str | None:
        if any(fragment in fqn for fragment in self.fragments):
            return "filter_fqns"
        n, k = module.weight.shape  # (out, in)
        if n % 16 or k % 16:
            return f"{n}x{k} not a multiple of 16"
        if self.auto and _too_small(self.recipe, n, k):
            return f"{n}x{k} small ({AUTO_FILTER})"
        return None

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        reason = self.reason_to_skip(module, fqn)
        if reason is None:
            self.selection.converted.append(fqn)
        else:
            self.selection.skipped[fqn] = reason
        return reason is None

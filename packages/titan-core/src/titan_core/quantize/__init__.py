"""Low-precision training (Float8, MX) through torchao, as model converters."""

from titan_core.quantize.converters import (
    ENTRY_POINT_GROUP,
    ModelConverter,
    adapt_tp_plan,
    apply_converters,
    build_converters,
    register_converter,
    warn_unused_sections,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModelConverter",
    "adapt_tp_plan",
    "apply_converters",
    "build_converters",
    "register_converter",
    "warn_unused_sections",
]

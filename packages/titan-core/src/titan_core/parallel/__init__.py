"""Parallelisms applied from outside to single-device models."""

from titan_core.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_core.parallel.compile import (
    compile_blocks,
    compile_loss,
    enable_async_tp,
    isolate_compile_cache,
)
from titan_core.parallel.dims import ParallelDims, ParallelMesh, check_supported, validate_layout
from titan_core.parallel.fsdp import apply_fsdp


def apply_context_parallel(*args, **kwargs):
    """See :func:`titan_core.parallel.context.apply_context_parallel` (imported on use)."""
    from titan_core.parallel.context import apply_context_parallel as apply

    return apply(*args, **kwargs)


__all__ = [
    "ParallelDims",
    "ParallelMesh",
    "apply_activation_checkpointing",
    "apply_context_parallel",
    "apply_fsdp",
    "check_supported",
    "compile_blocks",
    "compile_loss",
    "enable_async_tp",
    "isolate_compile_cache",
    "validate_layout",
]

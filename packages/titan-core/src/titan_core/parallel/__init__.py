"""Parallelisms applied from outside to single-device models."""

from titan_core.parallel.dims import ParallelDims, check_supported
from titan_core.parallel.fsdp import apply_fsdp

__all__ = ["ParallelDims", "apply_fsdp", "check_supported"]

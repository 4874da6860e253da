"""Parallelisms applied from outside to single-device models."""

from titan_core.parallel.dims import ParallelDims, ParallelMesh, check_supported
from titan_core.parallel.fsdp import apply_fsdp

__all__ = ["ParallelDims", "ParallelMesh", "apply_fsdp", "check_supported"]

"""How Llama 3 is parallelised: the shared decoder's passes (titan_core.parallel.decoder, which
fixes their order) with the dense tensor-parallel plan; Llama needs nothing of its own."""

from __future__ import annotations

from torch import nn

from titan_core.config import JobConfig
from titan_core.parallel import ParallelDims, ParallelMesh
from titan_core.parallel.decoder import dense_tp_plan, parallelize_decoder


def parallelize_llama(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh | None, config: JobConfig
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` (a whole model or a PP stage) in place."""
    return parallelize_decoder(model, dims, mesh, config, tp_plan=dense_tp_plan)

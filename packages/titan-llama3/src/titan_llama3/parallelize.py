"""How Llama 3 is parallelised. The order is fixed here and nowhere else:
(pipeline split first, elsewhere) -> TP -> CP -> activation checkpointing -> compile -> FSDP/HSDP.
This release applies FSDP/HSDP; the other passes slot in at their place in ``parallelize_llama``.
"""

from __future__ import annotations

from torch import nn

from titan_core.config import JobConfig
from titan_core.parallel import ParallelDims, ParallelMesh, apply_fsdp
from titan_core.precision import param_and_reduce_dtypes


def parallelize_llama(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh | None, config: JobConfig
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` in place and return it."""
    if mesh is None:
        return model
    if dims.fsdp_enabled or dims.dp_replicate > 1:
        param_dtype, reduce_dtype = param_and_reduce_dtypes(config.training, mesh.device_type)
        # HSDP shards within dp_shard and replicates across dp_replicate (a 2-D mesh).
        if dims.dp_replicate > 1:
            dp_mesh = mesh.get("dp_replicate", "dp_shard")
        else:
            dp_mesh = mesh.get("dp_shard_cp")
        apply_fsdp(
            model,
            dp_mesh,
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=config.parallelism.fsdp_reshard_after_forward,
        )
    return model

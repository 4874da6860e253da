"""How Qwen3 is parallelised: the shared decoder's passes (titan_core.parallel.decoder, which
fixes their order: TP -> EP -> CP -> AC -> compile -> FSDP/HSDP) with the dense tensor-parallel
plan plus the per-head q/k norms (replicated weights over head-sharded activations, see
``qk_norm_tp_plan``) and, for Qwen3-MoE's sparse layers, the shared MoE entries
(``moe_tp_plan``: sequence-sharded routing, routed experts left to expert parallel)."""

from __future__ import annotations

from torch import nn

from titan_core.config import JobConfig
from titan_core.parallel import ParallelDims, ParallelMesh
from titan_core.parallel.decoder import (
    Plan,
    dense_tp_plan,
    moe_tp_plan,
    parallelize_decoder,
    qk_norm_tp_plan,
)


def qwen3_tp_plan(loss_parallel: bool) -> tuple[Plan, Plan]:
    """(top-level plan, per-block plan): the shared dense plan plus the q/k norm entries and the
    MoE entries (each block takes those naming its modules)."""
    top, block = dense_tp_plan(loss_parallel)
    return top, {**block, **qk_norm_tp_plan(), **moe_tp_plan()}


def parallelize_qwen3(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh | None, config: JobConfig
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` (a whole model or a PP stage) in place."""
    return parallelize_decoder(model, dims, mesh, config, tp_plan=qwen3_tp_plan)

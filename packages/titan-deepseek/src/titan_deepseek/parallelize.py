"""How DeepSeek V3 is parallelised: the shared decoder's passes (titan_core.parallel.decoder,
which fixes their order: TP -> EP -> CP -> AC -> compile -> FSDP/HSDP) with the dense plan's
sequence-parallel norms and dense feed-forward, multi-head latent attention's plan
(``mla_tp_plan``: per-head projections column-wise, latents replicated) and the shared MoE
entries (``moe_tp_plan``: sequence-sharded routing, routed experts left to expert parallel)."""

from __future__ import annotations

from torch import nn

from titan_core.config import JobConfig
from titan_core.parallel import ParallelDims, ParallelMesh
from titan_core.parallel.decoder import Plan, dense_tp_plan, moe_tp_plan, parallelize_decoder
from titan_core.parallel.mla_plan import mla_tp_plan


def deepseek_v3_tp_plan(loss_parallel: bool) -> tuple[Plan, Plan]:
    """(top-level plan, per-block plan): the dense plan without its q/k/v entries, plus MLA's
    and the MoE's (each block takes those naming its modules)."""
    top, block = dense_tp_plan(loss_parallel)
    block = {k: v for k, v in block.items() if not k.startswith("attention.w")}
    return top, {**block, **mla_tp_plan(), **moe_tp_plan()}


def parallelize_deepseek_v3(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh | None, config: JobConfig
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` (a whole model or a PP stage) in place."""
    return parallelize_decoder(model, dims, mesh, config, tp_plan=deepseek_v3_tp_plan)

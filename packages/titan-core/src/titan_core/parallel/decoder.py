"""How the shared decoder (``titan_core.models.Transformer``) is parallelised. A family's
``parallelize.py`` calls :func:`parallelize_decoder` with its tensor-parallel plan. The order is
fixed here and nowhere else:

    (pipeline split first, by titan-core) -> TP -> EP -> CP -> activation checkpointing
    -> compile -> FSDP/HSDP

TP must see the plain modules (it swaps their parameters for DTensors), EP shards the routed
experts of MoE blocks and wraps them with their token all-to-alls, CP swaps the attention kernel
and RoPE, AC wraps whole blocks, compile traces the wrapped blocks, and FSDP goes last so it
shards the final parameters and groups each (wrapped, compiled) block, the expert-parallel
experts in groups of their own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan_core.config import JobConfig
from titan_core.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_core.parallel.compile import compile_blocks, enable_async_tp
from titan_core.parallel.dims import ParallelDims, ParallelMesh
from titan_core.parallel.expert_parallel import apply_expert_parallel
from titan_core.parallel.fsdp import ExpertsSharding, apply_fsdp
from titan_core.precision import param_and_reduce_dtypes
from titan_core.quantize import adapt_tp_plan

Plan = dict[str, ParallelStyle]
TPPlanFn = Callable[[bool], tuple[Plan, Plan]]


def dense_tp_plan(loss_parallel: bool) -> tuple[Plan, Plan]:
    """(top-level plan, per-block plan) as FQN -> style, with sequence parallel between blocks.

    Between blocks the activations are sharded along the sequence (``Shard(1)``); each block
    gathers them before attention and the feed-forward (colwise in, rowwise out) and
    reduce-scatters after. The output projection is vocab-sharded; with loss parallel the logits
    stay sharded into the cross entropy, otherwise they are gathered.

    Args:
        loss_parallel: keep the logits vocab-sharded for a loss-parallel cross entropy.
    """
    top: Plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    block: Plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    return top, block


def qk_norm_tp_plan() -> Plan:
    """Block plan entries for ``QKNormAttention``'s per-head ``q_norm`` and ``k_norm``.

    NOTE: inside attention the activations are not sequence-sharded (the block gathered the
    sequence before ``wq``/``wk``): each TP rank holds the full sequence but only its own heads,
    the column shard of the projections, as a local (B, S, heads / tp, head_dim) tensor. The
    norms' ``head_dim`` weights are replicated, and each rank's gradient for them covers only its
    heads, so the weight must be a replicated DTensor whose input is marked as sharded on the
    heads dimension (2): the gradient is then summed over the TP group. A plain local norm would
    train a different scale on every rank.
    """
    heads = SequenceParallel(sequence_dim=2, use_local_output=True)
    return {"attention.q_norm": heads, "attention.k_norm": heads}


def moe_tp_plan() -> Plan:
    """Block plan entries for an MoE layer (``moe``), beside the dense ``feed_forward`` ones.

    NOTE: the MoE works on this TP rank's slice of the sequence, the one sequence parallel
    leaves it between blocks (its input is not gathered, unlike a dense feed-forward's): every
    rank routes different tokens, so no routing is computed twice, and expert parallel (which
    spans the tp ranks, expert_tensor_parallel_degree = 1) exchanges each rank's tokens with
    the ranks holding their experts. The MoE flattens its input to (tokens, dim), so the
    sequence shard is dim 0 inside it:

    - ``router.gate``: a replicated weight over token-sharded activations (as the q/k norms):
      each rank's gradient covers its tokens only and is summed over the TP group;
    - ``shared_experts``: a dense SwiGLU, column-wise ``w1``/``w3`` and row-wise ``w2``, its
      input gathered over the tp ranks and its output reduce-scattered back to each rank's
      tokens;
    - ``experts``: left to expert parallel (``ep`` includes ``tp``).
    """
    return {
        "moe": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),), use_local_output=True
        ),
        "moe.router.gate": SequenceParallel(sequence_dim=0, use_local_output=True),
        "moe.shared_experts": PrepareModuleInput(
            input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)
        ),
        "moe.shared_experts.w1": ColwiseParallel(),
        "moe.shared_experts.w2": RowwiseParallel(output_layouts=Shard(0)),
        "moe.shared_experts.w3": ColwiseParallel(),
    }


def _present(module: nn.Module, plan: Plan) -> Plan:
    """The entries of ``plan`` naming a submodule ``module`` has: a dense block has no ``moe``,
    an MoE block no ``feed_forward``, an MoE without shared experts no ``moe.shared_experts``."""
    kept = {}
    for fqn, style in plan.items():
        try:
            found = module.get_submodule(fqn)
        except AttributeError:
            continue
        if found is not None:
            kept[fqn] = style
    return kept


def apply_tp(
    model: nn.Module,
    mesh: ParallelMesh,
    plan: tuple[Plan, Plan],
    async_tp: bool = False,
) -> None:
    """Tensor + sequence parallel over the ``tp`` mesh, skipping modules a PP stage dropped.

    Args:
        model: the decoder (or a pipeline stage of it).
        mesh: the world mesh; its ``tp`` dimension is used.
        plan: (top-level plan, per-block plan), e.g. from :func:`dense_tp_plan`; each block
            takes the entries naming its modules (dense and MoE blocks share one plan).
        async_tp: let the compiler overlap TP communication with matmuls (CUDA).
    """
    tp_mesh = mesh.get("tp")
    top, block = plan
    present = {name: style for name, style in top.items() if getattr(model, name) is not None}
    parallelize_module(model, tp_mesh, present)
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, _present(layer, block))
    if async_tp:
        enable_async_tp(tp_mesh)


def parallelize_decoder(
    model: nn.Module,
    dims: ParallelDims,
    mesh: ParallelMesh | None,
    config: JobConfig,
    tp_plan: TPPlanFn = dense_tp_plan,
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` (a whole model or a PP stage) in place.

    Args:
        model: a decoder following the module-name contract.
        dims: the parallel degrees.
        mesh: the world mesh, or None in a single process.
        config: the job config ([parallelism], [activation_checkpoint], [compile], [training]).
        tp_plan: ``tp_plan(loss_parallel)`` -> (top-level plan, per-block plan).
    """
    p = config.parallelism
    if mesh is not None and dims.tp > 1:
        top, block = tp_plan(not p.disable_loss_parallel)
        plan = (
            adapt_tp_plan(top, model, config, mesh.device_type),
            adapt_tp_plan(block, model, config, mesh.device_type),
        )
        apply_tp(model, mesh, plan, async_tp=p.enable_async_tensor_parallel)
    if mesh is not None and dims.ep > 1:
        apply_expert_parallel(model, mesh.get("ep"))
    if mesh is not None and dims.cp > 1:
        from titan_core.parallel.context import apply_context_parallel

        apply_context_parallel(
            model, mesh.get("cp"), config.training.seq_len, p.context_parallel_rotate_method
        )
    apply_activation_checkpointing(model, config.activation_checkpoint)
    if config.compile.enable and "model" in config.compile.components:
        compile_blocks(model, clone_inputs=dims.tp > 1)
    if mesh is not None and (dims.fsdp_enabled or dims.dp_replicate > 1):
        param_dtype, reduce_dtype = param_and_reduce_dtypes(config.training, mesh.device_type)
        experts = None
        if dims.ep > 1:
            experts = ExpertsSharding(mesh.experts_fsdp_mesh(dims), dims.expert_grad_divide_factor)
        apply_fsdp(
            model,
            mesh.fsdp_mesh(dims),
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=p.fsdp_reshard_after_forward,
            pipelined=dims.pp > 1,
            experts=experts,
        )
    return model

"""How Llama 3 is parallelised. The order is fixed here and nowhere else:

    (pipeline split first, by titan-core) -> TP -> CP -> activation checkpointing -> compile
    -> FSDP/HSDP

TP must see the plain modules (it swaps their parameters for DTensors), CP swaps the attention
kernel and RoPE, AC wraps whole blocks, compile traces the wrapped blocks, and FSDP goes last so
it shards the final parameters and groups each (wrapped, compiled) block.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan_core.config import JobConfig
from titan_core.parallel import (
    ParallelDims,
    ParallelMesh,
    apply_activation_checkpointing,
    apply_context_parallel,
    apply_fsdp,
    compile_blocks,
    enable_async_tp,
)
from titan_core.precision import param_and_reduce_dtypes


def tp_plan(loss_parallel: bool) -> tuple[dict, dict]:
    """(top-level plan, per-block plan) as FQN -> style, with sequence parallel between blocks.

    Between blocks the activations are sharded along the sequence (``Shard(1)``); each block
    gathers them before attention and the feed-forward (colwise in, rowwise out) and
    reduce-scatters after. The output projection is vocab-sharded; with loss parallel the logits
    stay sharded into the cross entropy, otherwise they are gathered.
    """
    top = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    block = {
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


def apply_tp(model: nn.Module, mesh: ParallelMesh, loss_parallel: bool, async_tp: bool) -> None:
    """Tensor + sequence parallel over the ``tp`` mesh, skipping modules a PP stage dropped."""
    tp_mesh = mesh.get("tp")
    top, block = tp_plan(loss_parallel)
    present = {name: style for name, style in top.items() if getattr(model, name) is not None}
    parallelize_module(model, tp_mesh, present)
    for layer in model.layers.values():
        parallelize_module(layer, tp_mesh, block)
    if async_tp:
        enable_async_tp(tp_mesh)


def parallelize_llama(
    model: nn.Module, dims: ParallelDims, mesh: ParallelMesh | None, config: JobConfig
) -> nn.Module:
    """Apply the configured parallelisms to ``model`` (a whole model or a PP stage) in place."""
    if mesh is not None and dims.tp > 1:
        apply_tp(
            model,
            mesh,
            loss_parallel=not config.parallelism.disable_loss_parallel,
            async_tp=config.parallelism.enable_async_tensor_parallel,
        )
    if mesh is not None and dims.cp > 1:
        apply_context_parallel(
            model,
            mesh.get("cp"),
            config.training.seq_len,
            config.parallelism.context_parallel_rotate_method,
        )
    apply_activation_checkpointing(model, config.activation_checkpoint)
    if config.compile.enable and "model" in config.compile.components:
        compile_blocks(model, clone_inputs=dims.tp > 1)
    if mesh is not None and (dims.fsdp_enabled or dims.dp_replicate > 1):
        param_dtype, reduce_dtype = param_and_reduce_dtypes(config.training, mesh.device_type)
        apply_fsdp(
            model,
            mesh.fsdp_mesh(dims),
            param_dtype=param_dtype,
            reduce_dtype=reduce_dtype,
            reshard_after_forward=config.parallelism.fsdp_reshard_after_forward,
            pipelined=dims.pp > 1,
        )
    return model

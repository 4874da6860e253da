"""How long a training step takes: FLOPs, memory traffic and communication over a device table.

A formula, not a measurement; every constant is named here with its reason, and the one fitted
constant (:data:`MATMUL_EFFICIENCY`) says what it was fitted on. Per device and per step:

- compute: the step's matmul FLOPs (the TrainSpec's FLOPs per token, plus what activation
  checkpointing recomputes) at the bf16 or fp8 peak times :data:`MATMUL_EFFICIENCY`, plus the
  memory-bound work (pointwise ops, the loss, Float8 casts, the optimizer) at HBM bandwidth;
- communication: bytes each mesh dimension moves, at NVLink bandwidth when its group fits in
  one node and at the NIC's otherwise, times :data:`COLLECTIVE_EFFICIENCY`; FSDP's and CP's
  traffic overlaps compute (only what exceeds it shows), TP's, EP's and PP's does not (async
  TP hides :data:`ASYNC_TP_HIDDEN` of TP's);
- pipeline bubble: ``(pp - 1) / (stages per rank x microbatches)`` of the stage time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from titan_core.config import JobConfig
from titan_core.parallel import ParallelDims
from titan_core.parallel.activation_checkpoint import parse_every_n
from titan_core.parallel.pipeline import stages_per_rank
from titan_core.plan.devices import Device

# Fitted: the fraction of peak the matmuls reach, from torchtitan's Llama 3.1 8B on 8 H100s
# with FSDP + compile (6,667 tokens/s/GPU; docs/planning.md, tests/test_plan_time.py).
MATMUL_EFFICIENCY = 0.425
# Fitted: pipeline stalls per ideal bubble slot (p2p latency, warm-up and drain overheads
# beyond the textbook bubble), from torchtitan's Llama 3.1 405B on 512 H100s with interleaved
# 1F1B (128 tokens/s/GPU).
BUBBLE_SCALE = 4.35
# Assumed: NCCL's ring collectives reach about 80% of the link's bandwidth as bus bandwidth
# (nccl-tests all_gather/reduce_scatter on NVLink and 400G InfiniBand).
COLLECTIVE_EFFICIENCY = 0.8
# Assumed: async TP (compile's micro-pipelined all-gather/reduce-scatter matmuls) hides half of
# TP's communication (torchtitan's async TP benchmark: 1.09-1.16x on 70B).
ASYNC_TP_HIDDEN = 0.5
# Counted: HBM bytes per token, per block, per unit of model width that a block's pointwise
# ops move forward + backward (RMSNorm x2, RoPE on q and k, two residual adds, SwiGLU's
# gate on a 3.5x-wide hidden; bf16 activations, fp32 inside the norms). Eager runs each op as its
# own kernel (470); compile fuses each chain into one kernel that reads its inputs and writes
# its outputs once (138).
POINTWISE_BYTES_EAGER = 470
POINTWISE_BYTES_COMPILED = 138
# Counted: bytes per logit of the fp32 cross entropy (write bf16 logits, upcast, softmax,
# gradient): 24.
LOSS_BYTES_PER_LOGIT = 24
# Counted: Float8's dynamic scaling reads a bf16 tensor for its amax and again to cast it, and
# writes fp8: 5 bytes per element; three casts per linear per token (input forward, output
# gradient and input again backward).
FP8_CAST_BYTES = 5
# Counted: fused AdamW reads parameter, gradient and two states and writes three, in fp32.
OPTIMIZER_BYTES_PER_PARAM = 28


@dataclasses.dataclass(frozen=True)
class StepCost:
    """The time model's answer for one device and one step.

    Args:
        flops: training FLOPs of this device's tokens (MFU's numerator, recomputation excluded).
        compute_s: matmuls and memory-bound work, recomputation included.
        comm_bytes: bytes this device sends per step, by mesh dimension.
        exposed_s: communication time not hidden behind compute, by mesh dimension.
        bubble_s: pipeline bubble.
        step_s: the estimated step time.
        tokens: this device's share of the step's tokens (as titan-train counts them).
    """

    flops: float
    compute_s: float
    comm_bytes: dict[str, float]
    exposed_s: dict[str, float]
    bubble_s: float
    step_s: float
    tokens: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s

    def mfu(self, device: Device) -> float:
        """Model FLOPs utilisation against the bf16 peak, as titan-train reports it."""
        return self.flops / self.step_s / device.bf16_flops


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the time model needs of the model, read once from its args and its meta module.

    Args:
        flops_per_token: the TrainSpec's training FLOPs per token.
        attention_flops_per_token: the part of it that grows with the context.
        params: parameters in all (FSDP moves and the optimizer updates all of them).
        n_layers, dim, vocab_size: the architecture.
        linear_width: per block, the sum of ``2 x in + out`` features of its linears (Float8
            cast traffic per token).
        experts_active: routed experts a token visits per MoE block (0 for dense blocks).
        moe_layers: blocks with routed experts.
    """

    flops_per_token: float
    attention_flops_per_token: float
    params: int
    n_layers: int
    dim: int
    vocab_size: int
    linear_width: int
    experts_active: int
    moe_layers: int


def step_cost(
    shape: ModelShape, config: JobConfig, dims: ParallelDims, device: Device, per_node: int
) -> StepCost:
    """The estimated step of one device (see the module docstring)."""
    t, p = config.training, config.parallelism
    mp = dims.pp * dims.tp * dims.cp
    tokens_dp = t.local_batch_size * t.seq_len * _grad_accumulation(config, dims)
    tokens = tokens_dp / mp  # this device's share, as titan-train counts it
    flops = shape.flops_per_token * tokens
    compute = _compute_s(shape, config, device, tokens, dims)
    comm = _comm_bytes(shape, config, dims, tokens_dp)
    bandwidth = {name: _bandwidth(name, dims, device, per_node) for name in comm}
    comm_s = {name: comm[name] / bandwidth[name] for name in comm}
    exposed = dict(comm_s)
    exposed["fsdp"] = max(0.0, comm_s["fsdp"] - compute) + comm_s["fsdp"] / max(
        shape.n_layers, 1
    )  # the first block's all-gather waits; the rest hides behind compute
    attention_s = compute * shape.attention_flops_per_token / shape.flops_per_token
    exposed["cp"] = max(0.0, comm_s["cp"] - attention_s)
    if p.enable_async_tensor_parallel and config.compile.enable:
        exposed["tp"] = comm_s["tp"] * (1 - ASYNC_TP_HIDDEN)
    stage = compute + exposed["tp"] + exposed["cp"] + exposed["ep"] + exposed["pp"]
    bubble = stage * _bubble_fraction(config, dims)
    step = stage + bubble + exposed["fsdp"] + exposed["dp_replicate"]
    return StepCost(flops, compute, comm, exposed, bubble, step, tokens)


def _grad_accumulation(config: JobConfig, dims: ParallelDims) -> int:
    t = config.training
    per_step = t.local_batch_size * dims.dp
    return 1 if t.global_batch_size == -1 else t.global_batch_size // per_step


def _recompute_fraction(config: JobConfig) -> tuple[float, float]:
    """(extra matmul work, extra pointwise work) that activation checkpointing recomputes, as
    fractions of the step's (forward is a third of forward + backward)."""
    ac = config.activation_checkpoint
    if ac.mode == "none":
        return 0.0, 0.0
    if ac.mode == "full":
        return 1 / 3, 1 / 3
    every = parse_every_n(ac.selective_ac_option)
    if every is None:  # op: matmuls and attention are kept, pointwise ops run again
        return 0.0, 1 / 3
    return 1 / (3 * every), 1 / (3 * every)


def _compute_s(
    shape: ModelShape, config: JobConfig, device: Device, tokens: float, dims: ParallelDims
) -> float:
    """Matmuls at the (bf16 or fp8) peak times the efficiency, plus memory-bound work."""
    extra_mm, extra_pw = _recompute_fraction(config)
    output_flops = 6 * shape.dim * shape.vocab_size  # the lm head stays bf16 under Float8
    linear = shape.flops_per_token - shape.attention_flops_per_token - output_flops
    float8 = "quantize.linear.float8" in config.model.converters and device.fp8_flops
    linear_rate = device.fp8_flops if float8 else device.bf16_flops
    per_token = (
        linear / linear_rate + (shape.attention_flops_per_token + output_flops) / device.bf16_flops
    )
    matmul_s = tokens * per_token * (1 + extra_mm) / MATMUL_EFFICIENCY
    width = POINTWISE_BYTES_COMPILED if config.compile.enable else POINTWISE_BYTES_EAGER
    layer_bytes = width * shape.dim * (1 + extra_pw)
    if float8:
        layer_bytes += FP8_CAST_BYTES * shape.linear_width
    memory = tokens * shape.n_layers * layer_bytes
    loss_parallel = dims.tp if not config.parallelism.disable_loss_parallel else 1
    memory += tokens * shape.vocab_size * LOSS_BYTES_PER_LOGIT / loss_parallel
    shard = dims.dp_shard * dims.cp * dims.tp * dims.pp
    memory += shape.params / shard * OPTIMIZER_BYTES_PER_PARAM
    return matmul_s + memory / device.hbm_bytes_per_s


def _comm_bytes(
    shape: ModelShape, config: JobConfig, dims: ParallelDims, tokens_dp: float
) -> dict[str, float]:
    """Bytes one device sends per step on each mesh dimension (ring collectives: a fraction
    ``(n - 1) / n`` of the buffer)."""
    t = config.training
    act = 2 if t.mixed_precision_param != "float32" else 4  # activation bytes per element
    reduce_bytes = 4 if t.mixed_precision_reduce == "float32" else 2
    recompute = config.activation_checkpoint.mode == "full"
    params_dev = shape.params / (dims.tp * dims.pp)  # what FSDP shards on this device
    shard = dims.dp_shard * dims.cp

    def ring(n: int) -> float:
        return (n - 1) / n

    accumulate = _grad_accumulation(config, dims)
    gathers = 2 * accumulate  # forward, and backward after reshard-after-forward
    fsdp = ring(shard) * params_dev * (gathers * act + reduce_bytes)
    replicate = 2 * ring(dims.dp_replicate) * params_dev / shard * reduce_bytes
    seq_tokens = tokens_dp / dims.cp  # the tokens this device's sequence shard holds
    layers = shape.n_layers / dims.pp
    tp_collectives = 8 + (4 if recompute else 0)  # SP: 2 gathers + 2 scatters each way
    tp = ring(dims.tp) * layers * tp_collectives * seq_tokens * shape.dim * act
    cp = ring(dims.cp) * layers * 3 * tokens_dp * shape.dim * act / dims.tp  # K, V each way
    ep_tokens = seq_tokens / dims.tp * shape.experts_active
    ep = ring(dims.ep) * shape.moe_layers / dims.pp * 4 * ep_tokens * shape.dim * act
    boundary = 2 * stages_per_rank(config.parallelism.pipeline_parallel_schedule)
    pp = (boundary * seq_tokens * shape.dim * act / dims.tp) if dims.pp > 1 else 0.0
    return {"fsdp": fsdp, "dp_replicate": replicate, "tp": tp, "cp": cp, "ep": ep, "pp": pp}


def _bandwidth(name: str, dims: ParallelDims, device: Device, per_node: int) -> float:
    """A dimension's bandwidth: NVLink when its group sits in one node (the mesh is ``pp,
    dp_replicate, dp_shard, cp, tp`` with ``tp`` innermost), the NIC otherwise."""
    inner = {
        "tp": 1,
        "cp": dims.tp,
        "ep": 1,
        "fsdp": dims.tp,
        "dp_replicate": dims.dp_shard * dims.cp * dims.tp,
        "pp": dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp,
    }[name]
    size = {
        "tp": dims.tp,
        "cp": dims.cp,
        "ep": dims.ep,
        "fsdp": dims.dp_shard * dims.cp,
        "dp_replicate": dims.dp_replicate,
        "pp": dims.pp,
    }[name]
    local = inner * size <= per_node if name != "pp" else inner < per_node
    link = device.intra_node_bytes_per_s if local else device.inter_node_bytes_per_s
    return link * COLLECTIVE_EFFICIENCY


def _bubble_fraction(config: JobConfig, dims: ParallelDims) -> float:
    if dims.pp == 1:
        return 0.0
    p, t = config.parallelism, config.training
    microbatches = t.local_batch_size // p.pipeline_parallel_microbatch_size
    ideal = (dims.pp - 1) / (stages_per_rank(p.pipeline_parallel_schedule) * microbatches)
    return BUBBLE_SCALE * ideal


def model_shape(spec: Any, args: Any, seq_len: int) -> ModelShape:
    """Read :class:`ModelShape` from the model args and a meta-device build of the model
    (once per model and sequence length: a search asks for it for every layout)."""
    key = (spec.name, repr(args), seq_len)
    if key not in _SHAPES:
        _SHAPES[key] = _read_shape(spec, args, seq_len)
    return _SHAPES[key]


_SHAPES: dict[tuple, ModelShape] = {}


def _read_shape(spec: Any, args: Any, seq_len: int) -> ModelShape:
    import torch
    from torch import nn

    with torch.device("meta"):
        model = spec.model_cls(args)
    params = sum(p.numel() for p in model.parameters())
    fpt = spec.flops_per_token_fn(args, params, seq_len) if spec.flops_per_token_fn else 6 * params
    heads, head_dim = getattr(args, "n_heads", 0), getattr(args, "head_dim", 0)
    attention = 12 * args.n_layers * heads * head_dim * seq_len
    block = model.layers[str(args.n_layers - 1)]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    width = sum(2 * m.in_features + m.out_features for m in linears)
    moe = getattr(args, "moe", None)
    moe_layers = 0
    if moe is not None:
        is_moe = getattr(args, "is_moe_layer", lambda i: True)
        moe_layers = sum(1 for i in range(args.n_layers) if is_moe(i))
    return ModelShape(
        flops_per_token=fpt,
        attention_flops_per_token=min(attention, fpt),
        params=params,
        n_layers=args.n_layers,
        dim=args.dim,
        vocab_size=args.vocab_size,
        linear_width=width,
        experts_active=moe.top_k if moe is not None else 0,
        moe_layers=moe_layers,
    )

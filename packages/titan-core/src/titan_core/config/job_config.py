"""The job configuration: one typed dataclass per TOML section.

Section and key names follow torchtitan (v0.2) so that its users' TOML files carry over. Every
field carries its meaning in ``metadata["help"]``; ``titan-train --help`` prints them and
``docs/configuration.md`` is generated from the same text. The defaults describe the embedded
default run: llama3 ``debugmodel`` on the embedded corpus, about a minute on a 2-core CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts: ``lo``/``hi`` inclusive unless ``open_lo``/``open_hi``."""

    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False
    open_hi: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.lo if self.open_lo else value >= self.lo
        below = value < self.hi if self.open_hi else value <= self.hi
        return above and below

    def describe(self) -> str:
        """``>= 0``, ``> 0`` or an interval such as ``in [0, 1)``."""
        lo, hi = _number(self.lo), _number(self.hi)
        if self.hi == math.inf:
            return f"{'>' if self.open_lo else '>='} {lo}"
        if self.lo == -math.inf:
            return f"{'<' if self.open_hi else '<='} {hi}"
        left, right = "(" if self.open_lo else "[", ")" if self.open_hi else "]"
        return f"in {left}{lo}, {hi}{right}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


NON_NEGATIVE = Bounds(lo=0)
POSITIVE = Bounds(lo=0, open_lo=True)
AT_LEAST_ONE = Bounds(lo=1)
FRACTION = Bounds(lo=0, hi=1)


def opt(default: Any, help: str, bounds: Bounds | None = None) -> Any:
    """A config field with a default, a one-sentence meaning and the numbers it accepts."""
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Job:
    config_file: str = opt("", "TOML file to read before the command-line overrides.")
    dump_folder: str = opt(
        "./outputs", "Folder for config.toml, metrics.jsonl, tb/ and checkpoints."
    )
    print_config: bool = opt(
        False, "Log the resolved config (the TOML saved as config.toml) at start, rank 0 only."
    )
    description: str = opt("default job", "Free text describing the run, saved with it.")


@dataclass
class Model:
    name: str = opt("llama3", "Model family, as registered by an installed package (titan.models).")
    flavor: str = opt("debugmodel", "Named size of the model family (see its flavors).")
    hf_assets_path: str = opt(
        "",
        "Folder with tokenizer.json (and tokenizer_config.json); a larger vocabulary than the "
        "flavor's sets vocab_size. Empty: the embedded tokenizer, or with initial_load_in_hf the "
        "HF folder's own; embedded: the embedded tokenizer.",
    )
    converters: list[str] = opt(
        [],
        "Passes applied to the model before parallelism, in order: quantize.linear.float8 "
        "(alias float8), quantize.linear.mx (alias mx), quantize.grouped_mm.float8, "
        "quantize.grouped_mm.mx, or one a plugin registers (titan.converters).",
    )


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer: AdamW or Adam.")
    lr: float = opt(8e-4, "Peak learning rate, reached at the end of warmup.", POSITIVE)
    beta1: float = opt(0.9, "Adam beta1.", Bounds(0, 1, open_hi=True))
    beta2: float = opt(0.95, "Adam beta2.", Bounds(0, 1, open_hi=True))
    eps: float = opt(1e-8, "Adam epsilon.", POSITIVE)
    weight_decay: float = opt(0.1, "Decoupled weight decay.", NON_NEGATIVE)
    implementation: Literal["fused", "foreach", "for-loop"] = opt(
        "fused", "Kernel style: fused, foreach or for-loop (all give the same update)."
    )


@dataclass
class LRScheduler:
    warmup_steps: int = opt(10, "Steps of linear warmup from lr/warmup_steps to lr.", NON_NEGATIVE)
    decay_ratio: float | None = opt(
        None,
        "Fraction of the post-warmup steps spent decaying (at the end); unset: all of them.",
        FRACTION,
    )
    decay_type: Literal["linear", "cosine", "sqrt"] = opt("linear", "Shape of the decay.")
    min_lr_factor: float = opt(
        0.0, "Learning rate at the end of decay, as a fraction of lr.", FRACTION
    )


@dataclass
class Training:
    dataset: str = opt(
        "embedded",
        "Data: 'embedded' (offline default; torchtitan's c4_test is the same), or a hub dataset "
        "such as c4, c4_validation or fineweb (streaming).",
    )
    dataset_path: str = opt("", "Local .jsonl/.parquet/.txt file or folder; overrides dataset.")
    dataset_streaming: bool = opt(
        False,
        "Read dataset_path as a stream, as hub datasets are read: each data-parallel rank reads "
        "only its own files when there are at least as many, and a resume continues where each "
        "stopped (same batches for the same data-parallel degree).",
    )
    shuffle_buffer: int = opt(
        0,
        "Streams only: serve documents in seeded random order within blocks of this many "
        "(0: the stream's own order); resumable, a resume reads one block again.",
        NON_NEGATIVE,
    )
    data_prefetch: int = opt(
        2,
        "Batches tokenized and packed ahead in a background thread while the step runs; 0 "
        "prepares each batch on the training thread.",
        NON_NEGATIVE,
    )
    local_batch_size: int = opt(8, "Sequences per data-parallel rank per microstep.", AT_LEAST_ONE)
    global_batch_size: int = opt(
        -1, "Sequences per optimizer step over all ranks; -1: local_batch_size x dp degree."
    )
    seq_len: int = opt(256, "Tokens per sequence.", AT_LEAST_ONE)
    max_norm: float = opt(
        1.0, "Gradient-norm clipping threshold (total norm); 0 disables.", NON_NEGATIVE
    )
    steps: int = opt(100, "Optimizer steps to train.", AT_LEAST_ONE)
    mixed_precision_param: Literal["auto", "float32", "bfloat16"] = opt(
        "auto",
        "Compute dtype: auto is bfloat16 on GPU and float32 on CPU. FSDP's parameter cast "
        "applies it where FSDP wraps the model, autocast in every other layout (the log's "
        "precision line says which).",
    )
    mixed_precision_reduce: Literal["float32", "bfloat16"] = opt(
        "float32", "Dtype of the gradient reduction across data-parallel ranks."
    )
    seed: int = opt(
        0,
        "Seed for weight init and data order; the same seed gives the same run.",
        Bounds(0, INT64_MAX),
    )
    deterministic: bool = opt(False, "Use deterministic algorithms (slower, bit-reproducible).")
    skip_nonfinite_steps: bool = opt(
        False,
        "On a NaN/inf loss or gradient norm, skip that step's update with a warning; "
        "off: stop the run before the update (exit 3).",
    )


@dataclass
class Validation:
    enable: bool = opt(False, "Measure the loss on held-out data every freq steps and at the end.")
    dataset: str = opt(
        "c4_validation",
        "Validation data, named as training.dataset names it (embedded, c4_validation, ...).",
    )
    dataset_path: str = opt("", "Local .jsonl/.parquet/.txt file or folder; overrides dataset.")
    local_batch_size: int = opt(8, "Validation sequences per data-parallel rank.", AT_LEAST_ONE)
    seq_len: int = opt(
        256, "Tokens per validation sequence (at most training.seq_len).", AT_LEAST_ONE
    )
    freq: int = opt(10, "Validate every N training steps (and after the last).", AT_LEAST_ONE)
    steps: int = opt(
        -1, "Validation batches per run; -1: the whole set (one pass over its documents)."
    )


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = opt(1, "Replicas in HSDP (plain DDP-style replication).")
    data_parallel_shard_degree: int = opt(-1, "FSDP shard degree; -1: all remaining ranks.")
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = opt(
        "default", "Free gathered parameters after forward: always, never, default (not the last)."
    )
    tensor_parallel_degree: int = opt(
        1, "Tensor-parallel degree (with sequence parallel); divides n_heads and n_kv_heads."
    )
    disable_loss_parallel: bool = opt(False, "Gather the vocab-sharded logits before the loss.")
    enable_async_tensor_parallel: bool = opt(False, "Async TP (CUDA with compile only).")
    pipeline_parallel_degree: int = opt(
        1, "Pipeline-parallel degree: stages of blocks on different ranks."
    )
    pipeline_parallel_schedule: str = opt(
        "1F1B",
        "Pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble, DualPipeV.",
    )
    pipeline_parallel_microbatch_size: int = opt(
        1, "Sequences per pipeline microbatch.", AT_LEAST_ONE
    )
    pipeline_parallel_layers_per_stage: int | None = opt(None, "Transformer blocks per stage.")
    context_parallel_degree: int = opt(
        1, "Context-parallel degree: each sequence split across ranks."
    )
    context_parallel_rotate_method: Literal["allgather", "alltoall"] = opt(
        "allgather", "How context-parallel ranks exchange keys and values."
    )
    expert_parallel_degree: int = opt(
        1,
        "Expert-parallel degree (MoE models): routed experts split over this many ranks, "
        "borrowed from data_parallel_shard x context_parallel x tensor_parallel; divides the "
        "expert count.",
    )
    expert_tensor_parallel_degree: int = opt(
        1,
        "Tensor-parallel degree inside each routed expert; only 1 (experts are whole on their "
        "expert-parallel rank).",
    )


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save DCP checkpoints, and resume from the newest complete one.")
    folder: str = opt("checkpoint", "Checkpoint folder inside job.dump_folder.")
    interval: int = opt(
        500, "Steps between checkpoints (the last step is always saved).", AT_LEAST_ONE
    )
    keep_latest_k: int = opt(
        10, "Complete checkpoints to keep (older ones deleted); 0 keeps all.", NON_NEGATIVE
    )
    load_step: int = opt(-1, "Resume from this step's checkpoint; -1: the newest complete one.")
    create_seed_checkpoint: bool = opt(
        False, "One process: write the initial weights as step-0 and exit; later runs start there."
    )
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = opt(
        "disabled",
        "disabled: saves block training; async: copy the state, write it in the background; "
        "async_with_pinned_mem: the same through pinned memory (CUDA only).",
    )
    exclude_from_loading: list[str] = opt(
        [],
        "Parts of a checkpoint not restored on resume: model, optimizer, lr_scheduler, "
        "dataloader, rng (e.g. --checkpoint.exclude_from_loading dataloader).",
    )
    last_save_model_only: bool = opt(
        False, "Make the final checkpoint weights only (in export_dtype), for export."
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Dtype of the weights in a model-only final checkpoint."
    )
    initial_load_path: str = opt(
        "",
        "Checkpoint (step-N folder or checkpoint folder) to start from when the dump folder "
        "holds none; an HF folder with initial_load_in_hf.",
    )
    initial_load_model_only: bool = opt(
        True, "From initial_load_path load the weights only (training restarts at step 1)."
    )
    initial_load_in_hf: bool = opt(
        False, "initial_load_path is a Hugging Face folder (config.json + safetensors)."
    )
    last_save_in_hf: bool = opt(
        False, "Also write the final model as a Hugging Face folder <dump_folder>/hf/."
    )


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = opt(
        "none", "Activation checkpointing: none, full (every block) or selective."
    )
    selective_ac_option: str = opt("2", "Selective AC: an integer N (every N-th block) or 'op'.")


@dataclass
class Compile:
    enable: bool = opt(
        False, "torch.compile each transformer block and/or the loss (compile.components)."
    )
    components: list[str] = opt(["model", "loss"], "What to compile: model, loss.")


@dataclass
class Float8Linear:
    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = opt(
        "tensorwise",
        "torchao Float8 recipe: tensorwise (one scale per tensor), rowwise (one per row), "
        "rowwise_with_gw_hp (rowwise, weight gradient in high precision).",
    )
    enable_fsdp_float8_all_gather: bool = opt(
        False, "FSDP gathers the weights in float8 (tensorwise only; half the bf16 traffic)."
    )
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(
        False,
        "After each optimizer step, compute every weight's float8 scale in one all-reduce "
        "(needs enable_fsdp_float8_all_gather).",
    )
    filter_fqns: list[str] = opt(
        [],
        "Linear layers left in high precision: a layer is skipped when its name contains one "
        "of these; auto_filter_small_kn also skips layers too small to gain from float8.",
    )
    emulate: bool = opt(
        False, "Emulate the float8 matmuls in high precision (any device; CPU tests)."
    )


@dataclass
class MXLinear:
    recipe_name: Literal[
        "mxfp8_rceil", "mxfp8_rceil_wgrad_with_hp", "mxfp8_emulated_rceil", "mxfp8_cublas_rceil"
    ] = opt(
        "mxfp8_rceil",
        "torchao MX recipe: mxfp8_rceil (CUDA >= 10.0 kernels), mxfp8_rceil_wgrad_with_hp, "
        "mxfp8_emulated_rceil (any device); mxfp8_cublas_rceil is torchtitan's name of mxfp8_rceil.",
    )
    filter_fqns: list[str] = opt(
        ["output"], "Linear layers left in high precision: skipped when the name contains one."
    )


@dataclass
class Float8GroupedMM:
    fqns: list[str] = opt(
        [],
        "MoE modules whose routed experts run float8 rowwise grouped matmuls (names containing "
        "one of these, e.g. experts); CUDA >= 8.9 with triton.",
    )


@dataclass
class MXGroupedMM:
    recipe_name: Literal[
        "mxfp8", "mxfp8_rceil", "mxfp8_rceil_wgrad_with_hp", "mxfp8_emulated_rceil"
    ] = opt(
        "mxfp8",
        "torchao MX recipe for the experts' grouped matmuls: mxfp8 (= mxfp8_rceil, CUDA >= 10.0), "
        "mxfp8_rceil_wgrad_with_hp, mxfp8_emulated_rceil (any device).",
    )
    fqns: list[str] = opt(
        [], "MoE modules whose routed experts run MX grouped matmuls (e.g. experts)."
    )


@dataclass
class QuantizeLinear:
    float8: Float8Linear = field(default_factory=Float8Linear)
    mx: MXLinear = field(default_factory=MXLinear)


@dataclass
class QuantizeGroupedMM:
    float8: Float8GroupedMM = field(default_factory=Float8GroupedMM)
    mx: MXGroupedMM = field(default_factory=MXGroupedMM)


@dataclass
class Quantize:
    """Settings of the quantize.* converters; a section acts only when model.converters names it."""

    linear: QuantizeLinear = field(default_factory=QuantizeLinear)
    grouped_mm: QuantizeGroupedMM = field(default_factory=QuantizeGroupedMM)


@dataclass
class Metrics:
    log_freq: int = opt(10, "Log every N steps (and the first and last step).", AT_LEAST_ONE)
    enable_tensorboard: bool = opt(
        True, "Write TensorBoard events to <dump_folder>/<save_tb_folder>/."
    )
    save_tb_folder: str = opt("tb", "TensorBoard folder name inside job.dump_folder.")
    enable_wandb: bool = opt(False, "Log to Weights & Biases (needs wandb installed).")
    disable_color_printing: bool = opt(
        False, "Never colour the console log (it is coloured only when stderr is a terminal)."
    )


@dataclass
class Profiling:
    enable_profiling: bool = opt(
        False, "Run torch.profiler on a schedule and write Chrome traces per rank."
    )
    save_traces_folder: str = opt(
        "profile_traces",
        "Trace folder inside job.dump_folder (iteration_<step>/rank<r>_trace.json).",
    )
    profile_freq: int = opt(
        10,
        "Profile window length in steps; a trace is written every profile_freq steps.",
        AT_LEAST_ONE,
    )
    profiler_active: int = opt(1, "Steps recorded at the end of each window.", AT_LEAST_ONE)
    profiler_warmup: int = opt(
        3, "Steps the profiler warms up (runs, discards) before the active ones.", NON_NEGATIVE
    )
    enable_memory_snapshot: bool = opt(
        False,
        "CUDA only: record the allocator history and dump a snapshot pickle per rank every "
        "profile_freq steps; on CPU a notice is logged and nothing is recorded.",
    )
    save_memory_snapshot_folder: str = opt(
        "memory_snapshot", "Memory snapshot folder inside job.dump_folder."
    )


@dataclass
class Debug:
    seed: int | None = opt(
        None, "torchtitan's spelling of training.seed; unset: training.seed.", Bounds(0, INT64_MAX)
    )
    deterministic: bool = opt(False, "torchtitan's spelling of training.deterministic.")
    deterministic_warn_only: bool = opt(
        False, "Deterministic algorithms, warning (not failing) on ops that have none."
    )
    moe_force_load_balance: bool = opt(
        False,
        "MoE models: route tokens to experts round-robin, not by score (perfect balance, for "
        "benchmarks and debugging).",
    )


@dataclass
class Comm:
    init_timeout_seconds: int = opt(
        300, "Timeout for process-group creation and first steps.", AT_LEAST_ONE
    )
    train_timeout_seconds: int = opt(
        300, "Timeout of each collective after the first step.", AT_LEAST_ONE
    )


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    validation: Validation = field(default_factory=Validation)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    quantize: Quantize = field(default_factory=Quantize)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    debug: Debug = field(default_factory=Debug)
    comm: Comm = field(default_factory=Comm)


def _is_group(cls: type) -> bool:
    """A dataclass made only of sub-sections (``[quantize]``), not of keys."""
    return all(is_dataclass(f.default_factory) for f in fields(cls))  # type: ignore[misc]


def sections(cls: type = JobConfig, prefix: str = "") -> dict[str, type]:
    """Section name -> section dataclass, in declaration order; nested sections are dotted
    (``quantize.linear.float8``), as TOML tables and command-line flags name them."""
    out: dict[str, type] = {}
    for f in fields(cls):
        sub = f.default_factory  # type: ignore[misc]
        if _is_group(sub):
            out.update(sections(sub, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = sub
    return out


def section_of(config: Any, name: str) -> Any:
    """The section object ``config.a.b.c`` named ``a.b.c``."""
    for part in name.split("."):
        config = getattr(config, part)
    return config

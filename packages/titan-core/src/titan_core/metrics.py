"""Training metrics: FLOP accounting, MFU denominators, memory, and the metrics sinks.

A run writes its metrics to three places (design §5): ``<dump_folder>/metrics.jsonl`` (one JSON
object per logged step, the record of truth), TensorBoard events under
``<dump_folder>/<metrics.save_tb_folder>/`` (default ``tb/``), and optionally Weights & Biases.
Only rank 0 logs; other ranks build a disabled :class:`MetricsLogger` whose methods do nothing.

MFU is ``achieved model FLOP/s / peak FLOP/s``. The numerator comes from
:func:`llama_flops_per_token` times tokens per second; the denominator from
:func:`device_peak_flops`, which uses the vendor's dense bf16 peak for known GPUs, for CPUs the
highest of the clock x vector-width figure and every fp32 matmul rate measured on the machine (a
probe timed on a busy machine reads low and made MFU read high), and a measured matmul rate
elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import torch

from titan_core.errors import UserError

logger = logging.getLogger("titan")

# Dense (no 2:4 structured sparsity) bf16 tensor-core peak per GPU, in FLOP/s, from the NVIDIA
# datasheets. The datasheets headline the *sparse* figure; dense is half of it:
#   H100 SXM5: 1,979 TFLOPS sparse -> 989.4e12 dense  (H100 Tensor Core GPU datasheet)
#   H100 PCIe: 1,513 TFLOPS sparse -> 756e12 dense    (same datasheet, PCIe column)
#   H100 NVL:  1,671 TFLOPS sparse -> 835e12 dense    (same datasheet, NVL column)
#   H200 SXM:  1,979 TFLOPS sparse -> 989.4e12 dense  (H200 Tensor Core GPU datasheet)
#   A100:        624 TFLOPS sparse -> 312e12 dense    (A100 Tensor Core GPU datasheet, SXM/PCIe)
#   B200:        4.5 PFLOPS sparse -> 2.25e15 dense   (HGX B200 datasheet, per GPU)
# Keys are matched as case-insensitive substrings of torch.cuda.get_device_name(), longest key
# first, so "NVIDIA H100 PCIe" hits "H100 PCIe" rather than the SXM "H100" entry.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "B200": 2.25e15,
}

_BYTES_PER_GIB = 1024**3


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device``; CPU ops are already synchronous."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _probe_size(
    device: torch.device, dtype: torch.dtype, size: int, limit_s: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Grow the matrix side up to ``size`` while one matmul is predicted to fit in ``limit_s``.

    Sizes double from 256, so the probes together cost about as much as the last one, and a slow
    device never runs a matmul far over the limit. The last probe is the timed loop's warm-up.

    Args:
        device: where to run.
        dtype: matmul dtype.
        size: the largest square side wanted.
        limit_s: the most one matmul should take, so a slow device still finishes in budget.

    Returns:
        ``(a, b, out, seconds_spent)`` with warmed ``n x n`` buffers, ``n <= size``.
    """
    start = time.perf_counter()
    # NOTE: a tiny matmul first pays one-off costs (BLAS handle creation, thread pool start-up)
    # so they do not make the first probe look slow.
    tiny = torch.ones(64, 64, device=device, dtype=dtype)
    torch.mm(tiny, tiny)
    _synchronize(device)
    n = min(size, 256)
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        _synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _synchronize(device)
        took = time.perf_counter() - t0
        bigger = min(2 * n, size)
        # Matmul time grows as n**3; small sizes run below peak, so this errs on the safe side.
        if bigger == n or took * (bigger / n) ** 3 > limit_s:
            return a, b, out, time.perf_counter() - start
        n = bigger


def measure_matmul_flops(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    size: int = 2048,
    budget_s: float = 0.8,
) -> float:
    """Measure the square-matmul rate of ``device`` in FLOP/s: the fastest of its timed batches.

    Runs ``torch.mm`` on ``size x size`` matrices (warm-up, then timed batches) within about
    ``budget_s`` seconds in total, using whatever thread count torch currently has. The side is
    capped below ``size`` where one matmul would take more than a quarter of the budget.

    Args:
        device: the device to measure.
        dtype: matmul dtype (fp32 for CPU MFU, bf16 for GPUs missing from the peak table).
        size: side of the square matrices; larger sizes get closer to peak on big GPUs.
        budget_s: wall-clock budget for the whole measurement, warm-up included.

    Returns:
        FLOP/s, counting ``2 * n**3`` FLOPs per ``n x n`` matmul.
    """
    if size < 1 or budget_s <= 0:
        raise ValueError(f"size and budget_s must be positive, got {size=} {budget_s=}")
    device = torch.device(device)
    a, b, out, spent = _probe_size(device, dtype, size, budget_s / 4)
    flops_per_mm = 2.0 * a.shape[0] ** 3
    timed_budget = max(budget_s - spent, budget_s / 4)
    # Run in doubling batches with one sync per batch: per-iteration syncs would add launch
    # latency to every (short) GPU matmul, and the batch is capped so we stop near the budget.
    # The fastest batch is the answer: other work on the machine only ever slows a batch down,
    # and a rate measured low would make MFU read high (above 1 on a busy 2-core CI machine).
    iters, batch, best = 0, 1, 0.0
    t0 = time.perf_counter()
    while True:
        started = time.perf_counter()
        for _ in range(batch):
            torch.mm(a, b, out=out)
        _synchronize(device)
        best = max(best, flops_per_mm * batch / (time.perf_counter() - started))
        iters += batch
        elapsed = time.perf_counter() - t0
        fits = int((timed_budget - elapsed) / (elapsed / iters))
        if fits < 1:
            return best
        batch = min(batch * 2, fits)


@functools.cache
def _measured_rate(device: torch.device, dtype: torch.dtype, size: int, threads: int) -> float:
    """Cached :func:`measure_matmul_flops`; ``threads`` is part of the key, as it sets CPU speed."""
    del threads  # only a cache key
    return measure_matmul_flops(device, dtype=dtype, size=size)


def _lookup_peak(name: str) -> tuple[str, float] | None:
    """Return the (key, peak) of ``PEAK_BF16_FLOPS`` whose key is in ``name``, longest key first."""
    lowered = name.lower()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in lowered:
            return key, PEAK_BF16_FLOPS[key]
    return None


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Return the peak FLOP/s to divide by for MFU on ``device``, and where the number came from.

    CUDA GPUs in :data:`PEAK_BF16_FLOPS` get the datasheet dense bf16 peak. Other GPUs get a
    measured bf16 matmul rate (with a warning: a measured rate is below the true peak, so MFU
    reads high). CPUs get the fp32 peak of :func:`cpu_peak_flops` (CPU runs train in fp32).
    Measured rates are taken once per process (per device, dtype and thread count) and cached.

    Args:
        device: the training device.

    Returns:
        ``(flops_per_second, description)``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hit = _lookup_peak(name)
        if hit is not None:
            key, peak = hit
            return peak, f"{name}: datasheet dense bf16 peak for {key} ({peak / 1e12:.1f} TFLOP/s)"
        rate = _measured_rate(device, torch.bfloat16, 8192, torch.get_num_threads())
        logger.warning(
            "GPU %r is not in titan_core.metrics.PEAK_BF16_FLOPS; MFU uses its measured bf16 "
            "matmul rate (%.1f TFLOP/s), which is below the true peak",
            name,
            rate / 1e12,
        )
        return rate, f"measured bf16 matmul rate on {name}"
    threads = torch.get_num_threads()
    rate = _measured_rate(device, torch.float32, 2048, threads)
    if device.type != "cpu":
        return rate, f"measured fp32 matmul rate on this {device.type} device"
    return cpu_peak_flops(threads, rate)


# fp32 FLOPs per cycle per core for the widest vector instructions the CPU reports: AVX-512 and
# AVX2 (which come with FMA) as two FMA units (2 FLOPs per lane each) of 16 and 8 lanes; AVX and
# SSE2 as one add and one multiply unit of 8 and 4 lanes.
_FP32_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16), ("sse2", 8))


def cpu_peak_flops(threads: int, measured: float) -> tuple[float, str]:
    """The CPU's fp32 peak for MFU: the highest of its clock x vector width and every matmul rate
    measured on this machine (``measured`` now, and earlier runs' from the cache).

    A probe timed while other work runs reads low, which made MFU read above 1 on a busy CI
    machine. Taking the highest rate ever seen (cached per CPU model and core count under
    ``$TITAN_CACHE_DIR``) and never less than the clock-derived figure keeps MFU in (0, 1] and
    makes it the same from run to run once one quiet measurement exists.
    """
    cores = min(threads, len(os.sched_getaffinity(0)))
    info = _cpuinfo()
    spec = _spec_flops(info, cores) if info else 0.0
    best = _machine_best(f"{info[0] if info else 'cpu'} x{cores}", measured)
    if best >= spec:
        return best, f"highest fp32 matmul rate measured on this CPU with {cores} threads"
    _, _, hz = info  # type: ignore[misc]
    return spec, f"fp32 peak of this CPU: {cores} cores x {hz / 1e9:.2f} GHz x vector width"


def _spec_flops(info: tuple[str, set[str], float], cores: int) -> float:
    """Every core at its reported clock retiring its widest vector unit's FLOPs each cycle."""
    _, flags, hz = info
    per_cycle = next((n for flag, n in _FP32_FLOPS_PER_CYCLE if flag in flags), 0)
    return cores * hz * per_cycle


def _cpuinfo() -> tuple[str, set[str], float] | None:
    """(model name, flags, clock in Hz) of the first CPU, or None off Linux or without a clock.

    The clock is the largest of /proc/cpuinfo's and cpufreq's maximum; a VM often reports its
    host's base clock, below the turbo clock it runs at, so the measured rate can beat it.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    try:
        hz = float(fields.get("cpu MHz", "")) * 1e6
    except ValueError:
        return None
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    with contextlib.suppress(OSError, ValueError):
        hz = max(hz, float(max_khz.read_text()) * 1e3)
    return fields.get("model name", "cpu"), set(fields.get("flags", "").split()), hz


def _machine_best(key: str, measured: float) -> float:
    """The highest rate measured for ``key`` on this machine, ``measured`` included (cached)."""
    from titan_core.data.embedded import cache_root

    path = cache_root() / "cpu_peak.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    best = known.get(key)
    best = float(best) if isinstance(best, (int, float)) and math.isfinite(best) else 0.0
    if measured > best:
        known[key] = measured
        with contextlib.suppress(OSError):  # a read-only cache only costs the stability
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            tmp.replace(path)
    return max(best, measured)


def llama_flops_per_token(
    num_params: int,
    num_embedding_params: int,
    n_layers: int,
    n_heads: int,
    head_dim: int,
    seq_len: int,
) -> float:
    """Training FLOPs (forward + backward) per token of a Llama-style decoder.

    ``6 * N`` counts every weight matmul: 2 FLOPs per multiply-add forward, 4 backward (input and
    weight gradients), where ``N`` is the parameter count without the token embedding table (a
    lookup, not a matmul). The output projection (lm head) *is* a matmul and stays in ``N``; with
    tied weights the one table is both, counted once in ``num_params``, so pass
    ``num_embedding_params=0`` (:func:`decoder_flops_per_token` does).

    ``12 * n_layers * n_heads * head_dim * seq_len`` counts the two attention matmuls whose size
    grows with context (``Q @ K^T`` and ``scores @ V``): ``2 * 2 * n_heads * head_dim * seq_len``
    forward per layer, times 3 for forward + backward. Causal masking is NOT discounted: a causal
    kernel skips about half of that work, but we follow the usual convention (PaLM appendix B) of
    counting the full square so MFU numbers compare across codebases.

    Args:
        num_params: total parameter count of the model.
        num_embedding_params: parameters in the token embedding table only (``vocab * dim``); not
            the lm head, not norms, not positional tables.
        n_layers: transformer blocks.
        n_heads: query heads (GQA shares K/V heads, but scores are computed per query head).
        head_dim: dimension per head.
        seq_len: training sequence length.

    Returns:
        FLOPs per token, as a float.
    """
    if not 0 <= num_embedding_params <= num_params:
        raise ValueError(
            f"need 0 <= num_embedding_params <= num_params, got {num_embedding_params=} "
            f"{num_params=}"
        )
    dense = 6.0 * (num_params - num_embedding_params)
    attention = 12.0 * n_layers * n_heads * head_dim * seq_len
    return dense + attention


def decoder_flops_per_token(args: Any, num_params: int, seq_len: int) -> float:
    """:func:`llama_flops_per_token` for model args with ``vocab_size``, ``dim``, ``n_layers``,
    ``n_heads``, ``head_dim`` and ``tie_word_embeddings`` (a TrainSpec's ``flops_per_token_fn``).

    NOTE: an untied embedding table is a lookup and is left out; a tied one is counted once in
    ``num_params`` and is the output matmul, so nothing is subtracted.
    """
    embedding = 0 if getattr(args, "tie_word_embeddings", False) else args.vocab_size * args.dim
    active = num_params - inactive_expert_params(args)
    return llama_flops_per_token(
        active, embedding, args.n_layers, args.n_heads, args.head_dim, seq_len
    )


def inactive_expert_params(args: Any) -> int:
    """Routed-expert weights a token does not use, for MoE args (0 for a dense model).

    Args with ``moe`` (a :class:`titan_core.models.moe.MoEArgs`) and ``is_moe_layer(i)``: every
    MoE layer holds ``num_experts`` SwiGLUs of ``3 * dim * moe.hidden_dim`` weights and a token
    runs ``top_k`` of them, so MFU counts only the active ones (the router and shared experts
    are active for every token).
    """
    moe = getattr(args, "moe", None)
    if moe is None:
        return 0
    sparse = sum(1 for i in range(args.n_layers) if args.is_moe_layer(i))
    return sparse * (moe.num_experts - moe.top_k) * 3 * args.dim * moe.hidden_dim


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process on ``device``, in GiB.

    CUDA reports the allocator's peak (``torch.cuda.max_memory_allocated``), so the trainer can
    reset it per interval. Elsewhere the peak resident set size of the whole process is the best
    cheap proxy; it never goes down.

    Args:
        device: the training device.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _BYTES_PER_GIB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    return rss_bytes / _BYTES_PER_GIB


# Console fields in print order: (record key, label, format of the value).
_CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "{:>4}"),
    ("loss", "loss", "{:7.4f}"),
    ("grad_norm", "grad_norm", "{:5.2f}"),
    ("lr", "lr", "{:.1e}"),
    ("tps", "tps", "{:,.0f}"),
    ("tflops", "tflops", "{:.2f}"),
    ("mfu", "mfu", "{:.1%}"),
    ("memory_gib", "mem", "{:.2f}GiB"),
    ("eta_s", "eta", "{}"),
    ("data_wait_s", "data_wait", "{:.1f}ms"),
    ("validation_loss", "val_loss", "{:7.4f}"),
    ("validation_perplexity", "val_ppl", "{:,.2f}"),
)
# Kept in metrics.jsonl but left off the console line to keep it short.
_CONSOLE_SKIP = frozenset(
    {"tokens_seen", "time", "total_steps", "validation_tokens", "validation_time"}
)


# ANSI colours of the console line's leading fields (only when stderr is a terminal).
_COLORS = {"step": "\033[36m", "loss": "\033[32m", "memory_gib": "\033[33m"}
_RESET = "\033[0m"


def format_console_line(record: Mapping[str, Any], color: bool = False) -> str:
    """Format one metrics record as a short console line.

    Standard fields print in a fixed order with fixed precision (``mfu``, a 0..1 fraction, as a
    percent); missing ones are skipped. Extra numeric keys (e.g. a checkpoint time) follow as
    ``key value``.

    Args:
        record: a metrics record, as passed to :meth:`MetricsLogger.log`.
        color: wrap the step, loss and memory fields in ANSI colours.
    """
    parts = []
    for key, label, fmt in _CONSOLE_FIELDS:
        if key in record:
            text = f"{label} {_console_value(key, fmt, record)}"
            parts.append(f"{_COLORS[key]}{text}{_RESET}" if color and key in _COLORS else text)
    known = {key for key, _, _ in _CONSOLE_FIELDS} | _CONSOLE_SKIP
    for key, value in record.items():
        if key not in known and isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


def _console_value(key: str, fmt: str, record: Mapping[str, Any]) -> str:
    """The step as ``step/total`` when the total is known; the ETA as ``1h02m``, ``3m05s``; the
    data wait in milliseconds."""
    if key == "step" and "total_steps" in record:
        width = len(str(record["total_steps"]))
        return f"{record['step']:>{width}}/{record['total_steps']}"
    if key == "eta_s":
        return format_duration(record[key])
    if key == "data_wait_s":  # seconds in the record, milliseconds on the line
        return fmt.format(record[key] * 1e3)
    return fmt.format(record[key])


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m`` or ``2d03h``; ``?`` for an unknown (NaN) duration."""
    if not math.isfinite(seconds):
        return "?"
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _plain(value: Any) -> Any:
    """Turn 0-d tensors and numpy scalars into Python numbers so json keeps full precision."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


class MetricsLogger:
    """Write metrics records to ``metrics.jsonl``, TensorBoard, W&B and the console.

    Build one per rank with ``enabled=(rank == 0)``: a disabled logger touches no file and every
    method is a no-op, so only one rank prints and writes. ``metrics.jsonl`` is opened in append
    mode, so a resumed run extends the same file.

    Args:
        dump_folder: the run's output folder; created if missing.
        enabled: False on non-zero ranks.
        enable_tensorboard: write TensorBoard events under ``<dump_folder>/<tb_subdir>/``.
        enable_wandb: log to Weights & Biases (needs ``pip install wandb``; honours the usual
            ``WANDB_*`` environment variables, e.g. ``WANDB_MODE=offline``).
        wandb_config: the resolved run config, stored with the W&B run.
        tb_subdir: TensorBoard folder name inside ``dump_folder``.
        color: colour the console line (the caller checks that stderr is a terminal).
    """

    def __init__(
        self,
        dump_folder: str | os.PathLike,
        *,
        enabled: bool,
        enable_tensorboard: bool,
        enable_wandb: bool,
        wandb_config: dict | None = None,
        tb_subdir: str = "tb",
        color: bool = False,
    ) -> None:
        self.enabled, self.color = enabled, color
        self._jsonl = None
        self._tb_writer = None
        self._wandb_run = None
        if not enabled:
            return
        folder = Path(dump_folder)
        # Check optional dependencies before creating anything, so a bad flag leaves no litter.
        wandb = _import_wandb() if enable_wandb else None
        summary_writer_cls = _import_summary_writer() if enable_tensorboard else None
        folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(folder / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if summary_writer_cls is not None:
            self._tb_writer = summary_writer_cls(log_dir=str(folder / tb_subdir))
        if wandb is not None:
            self._wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "titan"),
                dir=str(folder),
                config=wandb_config or {},
            )

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (must hold ``step``) to every enabled sink and print it.

        Every key goes to ``metrics.jsonl`` unrounded (``json.dumps`` of the Python value; a NaN
        loss is written as ``NaN``, which Python's json reads back). Numeric values other than
        ``step`` go to TensorBoard and W&B under their key as the tag, at ``step``.

        Args:
            record: step, loss, grad_norm, lr, tps, tflops, mfu (fraction), memory_gib,
                tokens_seen, time, plus any extra keys.
        """
        if not self.enabled:
            return
        if self._jsonl is None:
            raise RuntimeError("MetricsLogger.log() called after close()")
        plain = {key: _plain(value) for key, value in record.items()}
        step = int(plain["step"])
        self._jsonl.write(json.dumps(plain) + "\n")
        # Flush per record: a crashed run should still leave every step it logged.
        self._jsonl.flush()
        scalars = {
            key: value
            for key, value in plain.items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        if self._tb_writer is not None:
            for key, value in scalars.items():
                self._tb_writer.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        logger.info(format_console_line(plain, color=self.color))

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_metrics_sinks(cfg: Any, is_main: bool) -> None:
    """The optional packages the enabled sinks need are installed (only rank 0 logs)."""
    if cfg.enable_tensorboard and not cfg.save_tb_folder.strip():
        raise UserError(
            "metrics.save_tb_folder: empty; give a folder name inside job.dump_folder (e.g. tb)"
        )
    if is_main and cfg.enable_wandb:
        _import_wandb()
    if is_main and cfg.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        _import_summary_writer()


def _import_wandb() -> Any:
    """Import wandb on demand; it is an optional dependency (``titan-core[wandb]``)."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            "metrics.enable_wandb: wandb is not installed; pip install wandb or drop the flag"
        ) from None
    return wandb


def _import_summary_writer() -> Any:
    """Import TensorBoard's SummaryWriter on demand; the import alone takes about a second."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "metrics.enable_tensorboard: tensorboard is not installed; "
            "pip install tensorboard or drop the flag"
        ) from None
    return SummaryWriter

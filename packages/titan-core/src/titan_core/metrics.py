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

import importlib.util
import json
import logging
import math
import os
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import torch

from titan_core.errors import UserError
from titan_core.peak_flops import (  # noqa: F401  (the MFU denominator, re-exported)
    PEAK_BF16_FLOPS,
    device_peak_flops,
    measure_matmul_flops,
)

logger = logging.getLogger("titan")

_BYTES_PER_GIB = 1024**3


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

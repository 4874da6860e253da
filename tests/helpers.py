"""Shared helpers for tests that run the trainer (in-process or under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Tiny, fast settings for parity runs: fp32, deterministic, every step logged, no TensorBoard.
FAST = [
    "--training.seq_len", "64",
    "--training.steps", "8",
    "--lr_scheduler.warmup_steps", "2",
    "--metrics.log_freq", "1",
    "--metrics.no_enable_tensorboard",
    "--training.deterministic",
    "--training.mixed_precision_param", "float32",
]  # fmt: skip


# torchtitan's Float8 TOML, as its users bring it (the Float8 issue's acceptance config).
FLOAT8_TOML = """
[model]
converters = ["quantize.linear.float8"]
[quantize.linear.float8]
enable_fsdp_float8_all_gather = true
precompute_float8_dynamic_scale_for_fsdp = true
filter_fqns = ["output"]
[compile]
enable = true
components = ["model", "loss"]
"""


def write_validation_set(folder: Path, n_docs: int = 30) -> Path:
    """A small local validation set (the embedded corpus' first documents, about 3,500 tokens),
    so a whole-set validation takes well under a second."""
    from titan_core.data.sources import _read_embedded_corpus

    path = folder / "validation.jsonl"
    docs = _read_embedded_corpus()[:n_docs]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def validation_flags(path: Path, local_batch_size: int, freq: int = 4) -> list[str]:
    """Whole-set validation of ``path`` every ``freq`` steps (and after the last), seq_len 64."""
    return [
        "--validation.enable", "--validation.dataset_path", str(path), "--validation.freq",
        str(freq), "--validation.seq_len", "64", "--validation.local_batch_size",
        str(local_batch_size),
    ]  # fmt: skip


def validation_records(dump: Path) -> list[dict]:
    """The validation numbers of a run, one dict per validation."""
    return [
        {k: v for k, v in m.items() if k.startswith("validation_") and k != "validation_time"}
        for m in read_metrics(dump)
        if "validation_loss" in m
    ]


def read_metrics(dump: Path) -> list[dict]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(dump: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(dump)]


def run_cli(
    args: list[str], nproc: int = 1, timeout: int = 600, threads: int | None = None
) -> subprocess.CompletedProcess:
    """Run titan-train in a subprocess, under torchrun when nproc > 1, with ``threads`` threads
    per process (default: 1 under torchrun, 2 alone)."""
    threads = threads or (1 if nproc > 1 else 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "titan_core.train",
        ]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "titan_core.train"]
    return subprocess.run(
        cmd + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )

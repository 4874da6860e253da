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


def read_metrics(dump: Path) -> list[dict]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses(dump: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(dump)]


def run_cli(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run titan-train in a subprocess, under torchrun when nproc > 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONUNBUFFERED": "1"}
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

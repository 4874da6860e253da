"""Throughput and peak memory per rank of llama3 debugmodel under each parallel layout (CPU).

Each layout trains the same global batch (8 x 256 tokens) for a few steps under torchrun with
gloo; the layouts run one after the other in this one run, so compare them with each other.
tokens/s is for the whole job (all ranks); memory is the largest peak RSS of any rank.

    nox -s bench -- parallel          # or: python bench/bench_parallel.py --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

P = "--parallelism."
LAYOUTS = {
    "1 process": (1, ["--training.local_batch_size", "8"]),
    "FSDP 2": (2, ["--training.local_batch_size", "4"]),
    "TP 2": (2, [f"{P}tensor_parallel_degree", "2", "--training.local_batch_size", "8"]),
    "PP 2 (1F1B)": (
        2,
        [f"{P}pipeline_parallel_degree", "2", "--training.local_batch_size", "8",
         f"{P}pipeline_parallel_microbatch_size", "2"],
    ),
}  # fmt: skip


def run(nproc: int, extra: list[str], steps: int, dump: Path) -> dict:
    args = [
        "--job.dump_folder", str(dump), "--training.steps", str(steps),
        "--training.global_batch_size", "8", "--training.seq_len", "256",
        "--metrics.log_freq", str(steps // 2), "--metrics.no_enable_tensorboard", *extra,
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "titan_core.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(nproc), "-m", "titan_core.train"]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(launcher + args, check=True, env=env, capture_output=True)
    last = json.loads((dump / "metrics.jsonl").read_text().splitlines()[-1])
    return {"tps": last["tps"] * nproc, "memory_gib": last["memory_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print(f"{'layout':14s} {'tokens/s (job)':>15s} {'vs 1 process':>13s} {'peak GiB/rank':>14s}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, extra)) in enumerate(LAYOUTS.items()):
            result = run(nproc, extra, args.steps, Path(tmp) / str(i))
            base = base or result["tps"]
            print(
                f"{name:14s} {result['tps']:15,.0f} {result['tps'] / base:12.2f}x "
                f"{result['memory_gib']:14.2f}"
            )


if __name__ == "__main__":
    main()

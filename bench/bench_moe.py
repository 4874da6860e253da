"""MoE throughput on CPU: one MoE layer's forward + backward with grouped_mm vs the loop, and
the MoE debug models' training (qwen3 debugmodel_moe, deepseek_v3 debugmodel) in one process vs
expert parallel over 2 processes.

Everything is measured side by side in this one run (rounds alternate between the variants and
the medians are printed), so compare the numbers with each other, not with another day's.

    nox -s bench -- moe               # or: python bench/bench_moe.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from titan_core.models.moe import MoE, MoEArgs

# A layer of Qwen3-30B-A3B's proportions, shrunk to CPU size: 16 experts, top-4.
DIM, HIDDEN, EXPERTS, TOP_K, TOKENS = 512, 256, 16, 4, 4096


def layer_tokens_per_s(grouped: bool, iters: int) -> float:
    """Forward + backward tokens/s of one MoE layer (fp32) on TOKENS random tokens."""
    torch.manual_seed(0)
    args = MoEArgs(num_experts=EXPERTS, top_k=TOP_K, hidden_dim=HIDDEN, use_grouped_mm=grouped)
    layer = MoE(DIM, args)
    layer.init_weights(0.02)
    x = torch.randn(1, TOKENS, DIM, requires_grad=True)
    grad = torch.randn(1, TOKENS, DIM)
    layer(x).backward(grad)  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        layer(x).backward(grad)
    return TOKENS * iters / (time.perf_counter() - start)


MODELS = [("qwen3", "debugmodel_moe"), ("deepseek_v3", "debugmodel")]


def training_tokens_per_s(model: str, nproc: int, steps: int, dump: Path) -> float:
    """Job tokens/s of ``model`` (name:flavor), global batch 8 x 256, one process or EP over
    nproc."""
    name, flavor = model.split(":")
    args = [
        "--model.name", name, "--model.flavor", flavor,
        "--job.dump_folder", str(dump), "--training.steps", str(steps),
        "--training.global_batch_size", "8", "--training.local_batch_size", str(8 // nproc),
        "--training.seq_len", "256", "--metrics.log_freq", str(steps // 2),
        "--metrics.no_enable_tensorboard",
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "titan_core.train"]
    if nproc > 1:
        args += ["--parallelism.expert_parallel_degree", str(nproc)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(nproc), "-m", "titan_core.train"]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    subprocess.run(launcher + args, check=True, env=env, capture_output=True)
    last = json.loads((dump / "metrics.jsonl").read_text().splitlines()[-1])
    return last["tps"] * nproc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="layer passes per round")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument(
        "--models", nargs="+", default=[f"{n}:{f}" for n, f in MODELS], help="name:flavor ..."
    )
    args = parser.parse_args()
    layer = {"grouped_mm": [], "loop": []}
    for _ in range(args.rounds):
        for name in layer:
            layer[name].append(layer_tokens_per_s(name == "grouped_mm", args.iters))
    print(f"MoE layer fwd+bwd, fp32, {TOKENS} tokens, dim {DIM}, {EXPERTS} experts top-{TOP_K}:")
    loop = statistics.median(layer["loop"])
    for name, rates in layer.items():
        rate = statistics.median(rates)
        print(f"  {name:10s} {rate:12,.0f} tokens/s  {rate / loop:5.2f}x the loop")
    for model in args.models:
        training(model, args.rounds, args.steps)


def training(model: str, rounds: int, steps: int) -> None:
    print(f"{model} training, global batch 8 x 256 (job tokens/s):")
    runs: dict[str, list[float]] = {"1 process": [], "EP 2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, name in enumerate(runs):
                dump = Path(tmp) / f"{r}-{i}"
                runs[name].append(training_tokens_per_s(model, i + 1, steps, dump))
    one = statistics.median(runs["1 process"])
    for name, rates in runs.items():
        rate = statistics.median(rates)
        print(f"  {name:10s} {rate:12,.0f} tokens/s  {rate / one:5.2f}x one process")


if __name__ == "__main__":
    main()

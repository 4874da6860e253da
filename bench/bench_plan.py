"""titan-plan's time model against measured CPU runs: llama3 debugmodel under each layout of
bench_parallel (gloo, this machine), predicted tokens/s per device next to measured.

    nox -s bench -- plan          # or: python bench/bench_plan.py --steps 12
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_parallel import LAYOUTS, run
from titan_core.config import build_config
from titan_core.plan.cost import step_cost
from titan_core.plan.devices import find_device
from titan_core.plan.planner import Target, shape_of


def predicted(nproc: int, extra: list[str]) -> float:
    """titan-plan's tokens/s per device for the same flags on ``nproc`` local processes."""
    flags = ["--training.global_batch_size", "8", "--training.seq_len", "256", *extra]
    config = build_config(flags)
    target = Target(find_device("cpu", nproc), 1, nproc)
    shape, checked = shape_of(config, target)
    return step_cost(shape, config, checked.dims, target.device, nproc).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print(f"{'layout':14s} {'measured tok/s/dev':>19s} {'predicted':>10s} {'error':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (nproc, extra)) in enumerate(LAYOUTS.items()):
            measured = run(nproc, extra, args.steps, Path(tmp) / str(i))["tps"] / nproc
            guess = predicted(nproc, extra)
            print(f"{name:14s} {measured:19,.0f} {guess:10,.0f} {guess / measured - 1:+7.0%}")


if __name__ == "__main__":
    main()

"""Data loading: the loader's tokens/s on this CPU against the training step's, and the step's
wait for data with prefetching on and off (llama3 debugmodel, the embedded corpus).

The loader alone (tokenize + pack, on this thread) must outrun training by a wide margin for the
background thread to hide it; the wait per step shows whether it does. Measured in one run.

    nox -s bench -- data          # or: python bench/bench_data.py --steps 8 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from titan_core.config import build_config
from titan_core.trainer import Trainer


def trainer(dump: str, prefetch: int, seq_len: int, batch: int) -> Trainer:
    return Trainer(
        build_config(
            [
                "--job.dump_folder", dump, "--training.seq_len", str(seq_len),
                "--training.local_batch_size", str(batch), "--training.steps", "1000",
                "--training.data_prefetch", str(prefetch), "--metrics.no_enable_tensorboard",
            ]
        )
    )  # fmt: skip


def loader_tokens_per_s(t: Trainer, batches: int) -> float:
    """Batches prepared back to back on this thread (no training)."""
    loader = t.loader.loader  # the loader itself, not the prefetching wrapper
    tokens = t.config.training.seq_len * t.config.training.local_batch_size
    start = time.perf_counter()
    for _ in range(batches):
        loader.next_batch()
    return batches * tokens / (time.perf_counter() - start)


def step_wait(t: Trainer, steps: int) -> tuple[float, float]:
    """(mean seconds per training step, mean seconds of it spent waiting for data)."""
    t.train_step(t.loader.next_batch())  # warm-up (and the other trainer's thread refills)
    t.loader.take_wait()
    start = time.perf_counter()
    for _ in range(steps):
        t.train_step(t.loader.next_batch())
    elapsed = time.perf_counter() - start
    return elapsed / steps, t.loader.take_wait() / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {p: trainer(f"{tmp}/{p}", p, args.seq_len, args.batch) for p in (0, 2)}
        runs: dict[int, list[tuple[float, float]]] = {0: [], 2: []}
        for _ in range(args.rounds):  # alternating rounds: this VM drifts between runs
            for prefetch, t in trainers.items():
                runs[prefetch].append(step_wait(t, args.steps))
        for t in trainers.values():
            t.loader.close()
        rows = {
            p: tuple(statistics.median(r[i] for r in rs) for i in (0, 1)) for p, rs in runs.items()
        }
        fresh = trainer(f"{tmp}/loader", 0, args.seq_len, args.batch)
        loader_tps = statistics.median(loader_tokens_per_s(fresh, 20) for _ in range(3))
    tokens = args.seq_len * args.batch
    step_tps = tokens / rows[0][0]
    print(f"llama3 debugmodel, seq_len {args.seq_len}, batch {args.batch}, embedded corpus")
    print(f"loader alone        : {loader_tps:10,.0f} tokens/s")
    print(f"training step       : {step_tps:10,.0f} tokens/s  (loader / step: "
          f"{loader_tps / step_tps:.0f}x)")  # fmt: skip
    for prefetch, (step_s, wait_s) in rows.items():
        print(f"data_prefetch = {prefetch}   : step {step_s * 1e3:7.1f} ms, waiting for data "
              f"{wait_s * 1e3:6.2f} ms ({wait_s / step_s:.1%})")  # fmt: skip


if __name__ == "__main__":
    main()

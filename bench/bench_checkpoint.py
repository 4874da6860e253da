"""Checkpoint save/load speed against plain file I/O of the same bytes, and async blocking time.

A llama3 model of about 85M parameters trains 30 steps in one process with a checkpoint
every 10 steps, first with blocking saves, then with ``checkpoint.async_mode = "async"``; its
full state (weights + two Adam moments, about 1 GB) is what each checkpoint holds. In the same
run, the same bytes are written to one file and read back with plain file I/O (fsync'd like
DCP's files), so the ratios compare like with like on this machine's disk and page cache.

    nox -s bench -- checkpoint        # or: python bench/bench_checkpoint.py --saves 3 --interval 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from titan_core import get_train_spec, register_train_spec
from titan_core.train import run

FLAVOR = "bench-1gb"


def register_bench_flavor() -> None:
    """llama3 with ~85M parameters: weights + Adam moments ~ 1 GB of fp32."""
    spec = get_train_spec("llama3")
    args = dataclasses.replace(
        spec.flavors["debugmodel"], dim=1024, n_layers=6, n_heads=16, n_kv_heads=8
    )
    register_train_spec(dataclasses.replace(spec, flavors={**spec.flavors, FLAVOR: args}))


def train(dump: Path, steps: int, interval: int, mode: str) -> list[float]:
    """Train with a checkpoint every ``interval`` steps; return each save's blocking seconds."""
    args = [
        "--model.flavor", FLAVOR, "--job.dump_folder", str(dump),
        "--training.steps", str(steps), "--training.local_batch_size", "1",
        "--training.seq_len", "64", "--training.mixed_precision_param", "float32",
        "--metrics.log_freq", "10", "--metrics.no_enable_tensorboard",
        "--checkpoint.enable", "--checkpoint.interval", str(interval), "--checkpoint.keep_latest_k", "2",
        "--checkpoint.async_mode", mode,
    ]  # fmt: skip
    run(args)
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["checkpoint_blocking_s"] for r in records if "checkpoint_blocking_s" in r]


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Zero tensors of every shape in a checkpoint (what a load fills)."""
    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {
        k: torch.zeros(m.size, dtype=m.properties.dtype)
        for k, m in meta.items()
        if hasattr(m, "size")
    }


def timed_dcp_load(folder: Path) -> tuple[float, int]:
    state = stored_tensors(folder)
    start = time.perf_counter()
    dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return time.perf_counter() - start, sum(t.nbytes for t in state.values())


def raw_write_read(tensors: dict[str, torch.Tensor], path: Path) -> tuple[float, float]:
    """Seconds to write the tensors' bytes to one file (fsync'd) and to read them back."""
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in tensors.values():
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as f:
        for t in tensors.values():
            f.readinto(memoryview(t.numpy()).cast("B"))
    return write_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument(
        "--interval", type=int, default=10, help="steps between saves: a write must fit in them"
    )
    opts = parser.parse_args()
    steps, interval = opts.saves * opts.interval, opts.interval
    torch.set_num_threads(os.cpu_count() or 1)
    register_bench_flavor()
    with tempfile.TemporaryDirectory(prefix="titan-bench-ckpt-") as tmp:
        root = Path(tmp)
        sync = train(root / "sync", steps, interval, "disabled")
        newest = sorted((root / "sync" / "checkpoint").glob("step-*"))[-1]
        load_s, nbytes = timed_dcp_load(newest)
        tensors = stored_tensors(newest)
        for t in tensors.values():
            t.normal_()
        # The disk's speed drifts (page-cache writeback): take raw I/O's median of three,
        # measured before, between and after the checkpointed runs.
        # Each raw write goes to a new file, as each checkpoint does (a rewritten file would
        # let the kernel drop the old file's unwritten pages and flatter the raw number).
        raw = [raw_write_read(tensors, root / "raw-1.bin")]
        asyn = train(root / "async", steps, interval, "async")
        raw.append(raw_write_read(tensors, root / "raw-2.bin"))
        load_s = statistics.median([load_s, timed_dcp_load(newest)[0]])
        raw.append(raw_write_read(tensors, root / "raw-3.bin"))
        del tensors
    raw_w = statistics.median(w for w, _ in raw)
    raw_r = statistics.median(r for _, r in raw)
    # The first save also plans the layout and creates files: report the steady state.
    save_s = statistics.median(sync[1:])
    block_s = statistics.median(asyn[1:])
    gb = nbytes / 1e9
    print(
        f"\nfull training state: {gb:.2f} GB ({len(sync)} saves per mode; medians after the first)"
    )
    print("| what | seconds | GB/s | ratio |")
    print("|---|---|---|---|")
    print(f"| raw write (one file, fsync) | {raw_w:.2f} | {gb / raw_w:.2f} | 1 |")
    print(f"| DCP save (blocking) | {save_s:.2f} | {gb / save_s:.2f} | {raw_w / save_s:.2f} |")
    print(f"| raw read | {raw_r:.2f} | {gb / raw_r:.2f} | 1 |")
    print(f"| DCP load | {load_s:.2f} | {gb / load_s:.2f} | {raw_r / load_s:.2f} |")
    print(
        f"| async save: training blocked | {block_s:.3f} | - | "
        f"{block_s / save_s:.1%} of the blocking save |"
    )
    print(
        "\ngoals: DCP save >= 50% of raw write throughput; async blocking < 10% of a blocking save"
    )


if __name__ == "__main__":
    main()

"""The real peak tensor memory of titan-train's second training step, per rank (gloo, CPU).

The reference titan-plan's memory estimate is checked against: titan's own ``Trainer`` builds
the job from titan-train flags and runs two steps; the peak is that of step 2, the steady state
the estimate describes (step 1 creates the optimizer state). Run it alone or under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        tests/dist_scripts/measure_step_memory.py --out peaks.json --training.steps 2 ...

Every argument but ``--out`` is passed to titan-train's config; rank 0 writes ``--out`` as
``{"rank": peak_bytes}`` for every rank.

The instrument is torch's CPU allocator, not the ``MemTracker`` the estimate uses. Its
``caffe2_report_cpu_memory_usage`` flag makes it count the bytes live in every block it
allocates from then on, on every thread; the profiler (``profile_memory=True``) around step 2
reads that count with each allocation it sees. The count includes everything titan-train
allocates: parameters, gradients, optimizer state, buffers, the input batch and the staging
buffers of gloo's collectives.

NOTE: the flag, not the profiler alone. Without it the allocator counts only blocks a thread
under the profiler allocates and frees, and gloo's worker threads free staging buffers outside
it: the count then drifts up (by 57 MB over a TP 2 x FSDP 2 run with full AC whose peak is
74 MB) and differs from rank to rank with thread timing. The profiler reports allocations only
on threads that inherit it (gloo's do; the data loader's does not), so the test passes
``--training.data_prefetch 0``: an allocation on a thread it does not see is in the count from
the next event on, but cannot set a peak itself.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from titan_core.config import build_config
from titan_core.distributed import destroy_process_group, exit_now
from titan_core.trainer import Trainer


def count_every_allocation(on: bool = True) -> None:
    """Make the CPU allocator count the live bytes of every block allocated from now on (or
    stop counting). The flag is a global of libc10; torch has no Python setter for it."""
    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(c10, "FLAGS_caffe2_report_cpu_memory_usage").value = on


def peak_live_bytes(prof: profile) -> int:
    """The most bytes live at once while ``prof`` ran, from its allocation events."""
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            # before an allocation or after a free: the larger of the two sides of the event
            peak = max(peak, fields.total_allocated, fields.total_allocated - fields.alloc_size)
    return peak


def measure(trainer: Trainer) -> int:
    """Run steps 1 and 2 as ``Trainer.run_steps`` does; the peak live bytes of step 2."""
    trainer.step = 1
    trainer.train_step(trainer.loader.next_batch())
    trainer.step = 2
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(trainer.loader.next_batch())  # the batch is made inside: it counts
    return peak_live_bytes(prof)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    args, titan_argv = parser.parse_known_args(argv)
    count_every_allocation()  # before the trainer allocates anything
    trainer = Trainer(build_config(titan_argv))
    peak = measure(trainer)
    trainer.loader.close()
    trainer.metrics.close()
    trainer.checkpointer.close()
    peaks = [peak]
    if dist.is_initialized():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, peak)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({str(r): p for r, p in enumerate(peaks)}, f)
    if dist.is_initialized():
        destroy_process_group()
        exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1:])

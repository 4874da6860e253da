"""``[profiling]``: torch.profiler traces and CUDA memory snapshots on a step schedule.

Every ``profile_freq`` steps form one window: ``wait`` idle steps, ``profiler_warmup`` warmup
steps and ``profiler_active`` recorded steps, after which each rank writes
``<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json``.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from titan_core.errors import UserError

logger = logging.getLogger("titan")

# NOTE: the allocator keeps this many alloc/free events; older ones are dropped.
_MEMORY_HISTORY_ENTRIES = 100_000


def check_profiling(cfg: Any) -> None:
    """The schedule fits in one window, before any work starts."""
    if not cfg.enable_profiling:
        return
    if cfg.profiler_warmup + cfg.profiler_active > cfg.profile_freq:
        raise UserError(
            f"profiling.profiler_warmup ({cfg.profiler_warmup}) + profiling.profiler_active "
            f"({cfg.profiler_active}) exceed profiling.profile_freq ({cfg.profile_freq}); "
            "raise profile_freq or lower warmup/active"
        )
    for key in ("save_traces_folder", "save_memory_snapshot_folder"):
        if not getattr(cfg, key):
            raise UserError(f"profiling.{key}: empty; give a folder name inside job.dump_folder")


class StepProfiler:
    """The run's profiler and memory recorder; call :meth:`step` once per training step.

    Args:
        cfg: the ``[profiling]`` section.
        dump_folder: the run's output folder.
        rank: this process's global rank (names its files).
        device: the training device; CUDA adds GPU activity and enables memory snapshots.
        step: the last completed step (0, or the resumed step).
    """

    def __init__(self, cfg: Any, dump_folder: str, rank: int, device: torch.device, step: int):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.profiler: torch.profiler.profile | None = None
        self.snapshots: Path | None = None
        if cfg.enable_profiling:
            self.traces = Path(dump_folder) / cfg.save_traces_folder
            self.profiler = self._start_profiler(step)
        if cfg.enable_memory_snapshot and device.type != "cuda":
            if rank == 0:
                logger.info("profiling.enable_memory_snapshot: memory snapshots are CUDA-only")
        elif cfg.enable_memory_snapshot:
            self.snapshots = Path(dump_folder) / cfg.save_memory_snapshot_folder
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_ENTRIES)

    def _start_profiler(self, step: int) -> torch.profiler.profile:
        c = self.cfg
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        wait = c.profile_freq - c.profiler_warmup - c.profiler_active
        schedule = torch.profiler.schedule(
            wait=wait, warmup=c.profiler_warmup, active=c.profiler_active
        )
        profiler = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write_trace
        )
        profiler.start()
        profiler.step_num = step  # windows line up with global steps, also after a resume
        return profiler

    def _write_trace(self, profiler: torch.profiler.profile) -> None:
        folder = self.traces / f"iteration_{profiler.step_num}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}_trace.json"
        profiler.export_chrome_trace(str(path))
        if self.rank == 0:
            logger.info("profiling: trace of step %d written to %s", profiler.step_num, path)

    def step(self, step: int) -> None:
        """After training step ``step``: advance the schedule, dump a snapshot when due."""
        if self.profiler is not None:
            self.profiler.step()
        if self.snapshots is not None and step % self.cfg.profile_freq == 0:
            folder = self.snapshots / f"iteration_{step}"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.rank}_memory_snapshot.pickle", "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    def close(self) -> None:
        """Stop recording; safe to call twice."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.snapshots is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshots = None

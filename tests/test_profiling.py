"""[profiling]: Chrome traces on a step schedule; memory snapshots are CUDA-only."""

from __future__ import annotations

import json

import pytest

from helpers import FAST, run_cli

PROFILE = [
    *FAST,
    "--training.steps", "3",
    "--profiling.enable_profiling",
    "--profiling.profile_freq", "2",
    "--profiling.profiler_warmup", "0",
]  # fmt: skip


def test_a_profiled_run_writes_a_chrome_trace_per_window(tmp_path):
    dump = tmp_path / "run"
    proc = run_cli([*PROFILE, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    trace = dump / "profile_traces" / "iteration_2" / "rank0_trace.json"
    assert "traceEvents" in json.loads(trace.read_text())


@pytest.mark.distributed
def test_every_rank_writes_its_own_trace(tmp_path):
    dump = tmp_path / "run"
    proc = run_cli(
        [*PROFILE, "--training.local_batch_size", "4", "--job.dump_folder", str(dump)], 2
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        trace = dump / "profile_traces" / "iteration_2" / f"rank{rank}_trace.json"
        assert "traceEvents" in json.loads(trace.read_text())


def test_memory_snapshots_on_cpu_are_a_notice_not_an_error(tmp_path):
    dump = tmp_path / "run"
    args = [*FAST, "--training.steps", "2", "--profiling.enable_memory_snapshot"]
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "memory snapshots are CUDA-only" in proc.stderr
    assert not (dump / "memory_snapshot").exists()


def test_a_schedule_longer_than_its_window_is_refused_before_any_write(tmp_path):
    dump = tmp_path / "run"
    proc = run_cli([*PROFILE, "--profiling.profiler_warmup", "3", "--job.dump_folder", str(dump)])
    assert proc.returncode == 2
    assert "profiling.profiler_warmup (3) + profiling.profiler_active (1)" in proc.stderr
    assert not dump.exists()

"""A rank that dies must not leave the others hanging: the launcher exits non-zero, promptly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def worker_pids(marker: str) -> list[int]:
    """PIDs of training workers (not the torchrun agent) whose command line holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if marker in args and "titan_core.train" in args and "torch.distributed.run" not in args:
            pids.append(int(entry))
    return pids


def test_killing_one_rank_ends_the_job_with_an_error(tmp_path):
    dump = tmp_path / "killed-run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "titan_core.train", "--job.dump_folder", str(dump), "--training.steps", "100000",
        "--training.seq_len", "32", "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard",
        "--comm.train_timeout_seconds", "20",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "launcher.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while (
            not (dump / "metrics.jsonl").exists()
            or len((dump / "metrics.jsonl").read_text().splitlines()) < 2
        ):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        victims = worker_pids(str(dump))
        assert len(victims) == 2
        os.kill(victims[-1], signal.SIGKILL)
        start = time.time()
        proc.wait(timeout=120)
        assert proc.returncode != 0
        assert time.time() - start < 120
        assert not worker_pids(str(dump))  # no rank left behind
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
        for pid in worker_pids(str(dump)):
            os.kill(pid, signal.SIGKILL)

"""A bad config under torchrun is one error per job, not one per rank: rank 0 prints the line,
and torchrun's failure report names it as the root cause instead of pointing at a traceback."""

from __future__ import annotations

import pytest

from helpers import run_cli

pytestmark = pytest.mark.distributed


def test_a_config_error_is_printed_once_and_is_torchruns_root_cause(tmp_path):
    proc = run_cli(["--optimizer.beta1", "2", "--job.dump_folder", str(tmp_path / "x")], nproc=2)
    line = "titan-train: error: --optimizer.beta1: must be in [0, 1), got 2.0"
    assert proc.returncode != 0
    printed = [row for row in proc.stderr.splitlines() if row == line]
    assert len(printed) == 1, proc.stderr[-3000:]  # by rank 0 only
    root_cause = proc.stderr.split("Root Cause")[1]
    assert f"traceback : {line}" in root_cause  # torchrun's report quotes it
    assert "To enable traceback" not in root_cause
    assert not (tmp_path / "x").exists()

"""``nox -s gpu -- --dry-run`` end to end on CPU: the GPU benchmark script cannot rot unseen.

The dry run takes the GPU run's code path (test_gpu.py, then one titan-train subprocess per
configuration, metrics read back from each run's metrics.jsonl) with llama3 ``debugmodel`` cut
to 2 layers, seq_len 128, 4 steps (about a minute on 2 cores).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from helpers import REPO

MODES = ["eager", "compile", "float8+compile"]


def _tables(stdout: str) -> list[tuple[list[str], list[list[str]]]]:
    """The header and the data rows of each markdown table the run prints, in order."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [cell.strip() for cell in line.strip("|").split("|")]
            body = []
            for row in lines[i + 2 :]:
                if not row.startswith("| "):
                    break
                body.append([cell.strip() for cell in row.strip("|").split("|")])
            tables.append((header, body))
    return tables


def test_the_gpu_benchmark_dry_run_fills_every_column(tmp_path):
    cmd = [sys.executable, "bench/bench_gpu.py", "--dry-run", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]

    (header, rows), (plan_header, plan_rows) = _tables(proc.stdout)
    assert "MFU" in header and "tokens/s" in header and "peak mem (GiB)" in header
    assert [row[header.index("mode")] for row in rows] == MODES
    for row in rows:
        assert len(row) == len(header) and all(cell not in ("", "-") for cell in row), row
        assert row[header.index("status")] == "ok"
        assert row[header.index("layers")] == "2 of 6"  # the layer cut the 8B uses on a GPU
    assert "torchtitan: " in proc.stdout  # compared, or why not
    # titan-plan's prediction beside each titan run, every cell filled
    assert [row[plan_header.index("mode")] for row in plan_rows] == MODES
    for row in plan_rows:
        assert len(row) == len(plan_header) and all(cell not in ("", "-") for cell in row), row

    (path,) = tmp_path.glob("dry-run-*.json")
    result = json.loads(path.read_text())
    assert result["tests"]["returncode"] == 0  # tests/test_gpu.py ran (skipped without CUDA)
    titan = [row for row in result["rows"] if row["trainer"] == "titan"]
    assert [row["mode"] for row in titan] == MODES  # one row per configuration
    for row in titan:
        numbers = [row[k] for k in ("tokens_per_s", "tflops", "memory_gib", "loss")]
        assert all(math.isfinite(x) and x > 0 for x in numbers), row
        assert 0 < row["mfu"] <= 1 and row["steps"] == 4
        # The MFU is the trainer's: tflops / mfu is the peak the trainer logged it divides by.
        peak = float(row["mfu_peak"].split(" FLOP/s")[0])
        assert row["tflops"] * 1e12 / row["mfu"] == pytest.approx(peak, rel=5e-3)
        # The plan's numbers are titan-plan's own for the same flags on this machine.
        assert row["plan_fits"] is True and row["plan_memory_gib"] > 0
        assert row["plan_tokens_per_s"] > 0 and row["plan_note"] == ""
    assert result["planner"] == "titan-plan --gpu cpu"

"""The GPU benchmark's planner column (bench/gpu_plan.py): titan-plan's own numbers, matched to
the runs they predict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.fixture
def gpu_plan(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_plan

    return gpu_plan


def test_the_planner_child_prints_what_titan_plan_prints(tmp_path):
    argv = ["--model.flavor", "debugmodel", "--training.seq_len", "512", "--compile.enable",
            "--activation_checkpoint.mode", "full"]  # fmt: skip
    refused = ["--model.flavor", "debugmodel", "--parallelism.tensor_parallel_degree", "3"]
    jobs = [
        {"key": "ok", "flavor": "debugmodel", "n_layers": 0, "argv": argv},
        {"key": "cut", "flavor": "debugmodel", "n_layers": 2,
         "argv": ["--model.flavor", "debugmodel-2L", *argv[2:]]},
        {"key": "refused", "flavor": "debugmodel", "n_layers": 0, "argv": refused},
    ]  # fmt: skip
    request, out = tmp_path / "request.json", tmp_path / "out.json"
    request.write_text(json.dumps({"device": "h200", "jobs": jobs}))
    child = [sys.executable, "bench/gpu_plan.py", str(request), str(out)]
    proc = subprocess.run(child, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    planned = json.loads(out.read_text())

    cli = [sys.executable, "-m", "titan_core.plan.cli", *argv, "--gpu", "h200",
           "--gpus-per-node", "1", "--json"]  # fmt: skip
    proc = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(proc.stdout)
    for key in ("tokens_per_s_per_device", "tensor_peak_gib", "memory_gib_per_device", "fits"):
        assert planned["ok"][key] == expected[key], key
    # the cut flavor is registered in the child: 2 of debugmodel's 6 blocks
    assert planned["cut"]["num_params"] < expected["num_params"]
    assert planned["cut"]["tokens_per_s_per_device"] > expected["tokens_per_s_per_device"]
    assert planned["refused"]["error"].startswith("titan-plan refused it: ")
    assert "tensor_parallel_degree" in planned["refused"]["error"]


def test_each_titan_row_takes_its_own_configs_plan(gpu_plan):
    from gpu_report import Row

    def row(trainer, mode, ac):
        return Row(trainer, "1B", "16", mode, "bf16", ac, 8192, 2, status="ok")

    rows = [row("titan", "eager", "none"), row("titan", "compile", "full"),
            row("titan", "float8+compile", "none"), row("torchtitan", "compile", "none")]  # fmt: skip
    plan = {"tokens_per_s_per_device": 1000.0, "tensor_peak_gib": 30.0,
            "memory_gib_per_device": 35.5, "fits": True}  # fmt: skip
    planned = {
        gpu_plan.job_key("1B", "eager", "none"): plan,
        gpu_plan.job_key("1B", "compile", "full"): {**plan, "tokens_per_s_per_device": 800.0},
        gpu_plan.job_key("1B", "compile", "none"): {**plan, "tokens_per_s_per_device": 1.0},
    }
    gpu_plan.apply(rows, planned, "", on_gpu=True)
    eager, compiled, float8, torchtitan = rows
    assert (eager.plan_tokens_per_s, eager.plan_memory_gib, eager.plan_fits) == (1000, 30, True)
    assert compiled.plan_tokens_per_s == 800  # the AC mode it ran with, not the other one
    assert float8.plan_tokens_per_s is None and float8.plan_note == "not planned"
    assert torchtitan.plan_tokens_per_s is None and torchtitan.plan_note == ""

    cpu_row = row("titan", "eager", "none")
    gpu_plan.apply([cpu_row], planned, "", on_gpu=False)
    assert cpu_row.plan_memory_gib == 35.5  # RSS is compared with the whole process

    failed = row("titan", "eager", "none")
    gpu_plan.apply([failed], {}, "titan-plan failed: boom", on_gpu=True)
    assert failed.plan_note == "titan-plan failed: boom" and failed.plan_tokens_per_s is None


@pytest.mark.parametrize(
    ("name", "on_gpu", "expected"),
    [("NVIDIA H200", True, "h200"), ("NVIDIA H100 80GB HBM3", True, "h100"),
     ("NVIDIA A100-SXM4-80GB", True, "a100"), ("NVIDIA L4", True, None),
     ("CPU (2 cores)", False, "cpu")],
)  # fmt: skip
def test_the_device_is_named_as_titan_plan_names_it(gpu_plan, name, on_gpu, expected):
    assert gpu_plan.planner_device(name, on_gpu) == expected

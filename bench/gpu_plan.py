"""titan-plan's prediction of each titan run of ``bench_gpu.py``, printed beside the measured.

A first GPU run is also the planner's first check against a real GPU (docs/planning.md checks its
time model against torchtitan's published runs and its memory against gloo runs on CPU). The
planner needs no GPU: it runs the training step on fake tensors. So it runs as one child process
of its own (CUDA hidden, two threads, lowered priority), started before ``tests/test_gpu.py`` so
that it overlaps the tests rather than the timed runs. The child registers the cut flavors the
runs use, plans every configuration from the run's own titan-train flags, and writes one JSON
object. Both activation checkpointing modes a run may end up with are planned.

Memory is compared as the trainer counts it: on a GPU, the allocator's peak
(``max_memory_allocated``) against the plan's tensor peak; on CPU, the process's peak RSS
against the plan's total per process (its tensors plus the process's own).

    python bench/gpu_plan.py REQUEST.json OUT.json    # the child; bench_gpu.py starts it
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# titan-plan's device table by the names nvidia-smi prints; the first match wins.
PLANNER_DEVICES = (("H200", "h200"), ("B200", "b200"), ("A100", "a100"), ("H100", "h100"))
PLANNED_AC = ("none", "full")  # without AC, and the retry with full AC after running out


def planner_device(device_name: str, on_gpu: bool) -> str | None:
    """titan-plan's ``--gpu`` name for this device; None when its table has no entry."""
    if not on_gpu:
        return "cpu"
    name = device_name.upper()
    return next((ours for key, ours in PLANNER_DEVICES if key in name), None)


def job_key(shape: str, mode: str, ac: str) -> str:
    return f"{shape}|{mode}|{ac}"


@dataclass
class Predictions:
    """The planner child, running; :meth:`collect` waits for its JSON."""

    proc: subprocess.Popen | None
    out: Path
    log: Path
    why_not: str = ""

    def collect(self, timeout: float) -> dict[str, dict]:
        """Each planned configuration by :func:`job_key`; empty, with ``why_not`` set, when the
        child failed or ran past ``timeout``."""
        if self.proc is None:
            return {}
        try:
            rc = self.proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.why_not = "titan-plan ran past the time budget"
            return {}
        if rc != 0 or not self.out.is_file():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            self.why_not = f"titan-plan failed: {lines[-1][:160] if lines else rc} ({self.log})"
            return {}
        return json.loads(self.out.read_text())


def start(jobs: list[dict], device: str | None, work: Path, env: dict) -> Predictions:
    """Start planning ``jobs`` (dicts of key, flavor, n_layers and titan-train argv) on
    ``device`` in the background."""
    out, log = work / "plan.json", work / "plan.log"
    if device is None:
        return Predictions(None, out, log, why_not="titan-plan has no entry for this device")
    request = work / "plan-request.json"
    request.write_text(json.dumps({"device": device, "jobs": jobs}))
    child_env = {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(request), str(out)]
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=child_env)
    return Predictions(proc, out, log)


def apply(rows: list[Any], planned: dict[str, dict], why_not: str, on_gpu: bool) -> None:
    """Fill each titan row's ``plan_*`` fields from its configuration's plan."""
    for row in rows:
        if row.trainer != "titan":
            continue
        found = planned.get(job_key(row.shape, row.mode, row.ac))
        if found is None or "error" in found:
            row.plan_note = found["error"] if found else (why_not or "not planned")
            continue
        row.plan_tokens_per_s = found["tokens_per_s_per_device"]
        row.plan_memory_gib = found["tensor_peak_gib" if on_gpu else "memory_gib_per_device"]
        row.plan_fits = found["fits"]


def child(request_path: str, out_path: str) -> int:
    """Plan every job of the request; a config titan-plan refuses gets its one-line reason."""
    os.nice(10)
    import torch

    torch.set_num_threads(2)
    from bench_gpu import register_cut_flavors
    from titan_core.config import build_config
    from titan_core.errors import UserError
    from titan_core.plan.devices import find_device
    from titan_core.plan.planner import Target, plan_layout
    from titan_core.plan.report import as_json

    request = json.loads(Path(request_path).read_text())
    jobs = request["jobs"]
    register_cut_flavors(sorted({(job["flavor"], job["n_layers"]) for job in jobs}))
    target = Target(find_device(request["device"], 1), nodes=1, per_node=1)
    planned = {}
    for job in jobs:
        try:
            plan = plan_layout(build_config(job["argv"]), target, all_ac=False)
            planned[job["key"]] = as_json(plan)
        except UserError as e:
            planned[job["key"]] = {"error": f"titan-plan refused it: {e}"}
        print(f"planned {job['key']}", flush=True)
    Path(out_path).write_text(json.dumps(planned))
    return 0


if __name__ == "__main__":
    sys.exit(child(*sys.argv[1:]))

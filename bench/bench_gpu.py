"""GPU benchmark (``nox -s gpu``): the GPU tests, then llama3 shapes in three modes, one table.

On one GPU (H100 / H200 class) it runs ``tests/test_gpu.py``, then trains llama3 ``1B``, ``3B``
and ``8B`` cut to 16 of its 32 layers (the whole 8B with fp32 weights, gradients and Adam states
needs about 145 GB before activations) at seq_len 8192, each as bf16 eager, bf16 + compile and
Float8 + compile. Each run is a ``titan-train`` subprocess; its tokens/s, TFLOP/s, MFU, peak
memory and loss are read from the run's own ``metrics.jsonl``, so the MFU printed is the
trainer's. A run that runs out of memory is retried once with full activation checkpointing.
The table is printed as runs finish and written as JSON under ``bench/results/`` after each run.
When torchtitan is importable, its llama3 trains the same shapes and batch (bf16 + compile) in
the same invocation and the ratio is printed. A second table puts titan-plan's prediction of
each titan run (tokens/s, peak memory, fits or not; ``gpu_plan.py``) beside what it measured.

The GPU machine has PyTorch but no package registry: ``--print-wheels`` lists the wheels to carry
in the repo's git-ignored ``.whl/`` folder; the script installs them from there on its own.

    python bench/bench_gpu.py                  # on the GPU machine (or: nox -s gpu)
    python bench/bench_gpu.py --dry-run        # CPU, debugmodel cut to 2 layers: the same path
    python bench/bench_gpu.py --print-wheels   # the wheels to carry, and the commands
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path

import gpu_plan
import gpu_torchtitan
from gpu_report import COLUMNS, Row, cells, print_summary, ratios

REPO = Path(__file__).resolve().parents[1]
say = functools.partial(print, flush=True)
PACKAGES = ("titan-core", "titan-llama3", "titan-qwen3", "titan-deepseek", "titan-convert")
SRC_DIRS = [str(REPO / "packages" / name / "src") for name in PACKAGES]
WHEEL_DIR = REPO / ".whl"
SITE = Path(tempfile.gettempdir()) / "titan-bench-site"

# torchao 0.18 is the release built against torch 2.11 (the GPU machine's); Float8 needs it.
REQUIRED_WHEELS = ("torchao==0.18.0",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One model size: a llama3 flavor, optionally with fewer blocks, and its batch."""

    label: str
    flavor: str
    n_layers: int | None = None  # None: the flavor's own
    batch: int = 1

    @property
    def flavor_name(self) -> str:
        return f"{self.flavor}-{self.n_layers}L" if self.n_layers else self.flavor


GPU_SHAPES = (Shape("1B", "1B", batch=2), Shape("3B", "3B"), Shape("8B", "8B", n_layers=16))
DRY_SHAPES = (Shape("debugmodel", "debugmodel", n_layers=2, batch=2),)
MODES = ("eager", "compile", "float8+compile")
PLAN_TIMEOUT_S = 120  # titan-plan on every configuration, at most


@dataclass(frozen=True)
class Plan:
    """What one invocation runs."""

    dry_run: bool
    shapes: tuple[Shape, ...]
    modes: tuple[str, ...]
    seq_len: int
    steps: int
    warmup: int  # leading steps left out of the medians (compilation, allocator)
    compile_backend: str
    budget_s: float
    run_timeout_s: float
    tests_timeout_s: float
    run_tests: bool
    torchtitan_modes: tuple[str, ...]


# ---- the runs ------------------------------------------------------------------------------


def run_logged(cmd: list[str], env: dict, timeout: float, log: Path) -> int | None:
    """Run ``cmd`` with its output in ``log``; None when it ran past ``timeout`` (then its whole
    process group is killed, so a hung compile worker cannot hold the GPU)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def titan_args(plan: Plan, shape: Shape, mode: str, ac: str, dump: Path) -> list[str]:
    """titan-train flags of one run (the trainer's defaults otherwise: bf16 on GPU)."""
    args = [
        "--model.flavor", shape.flavor_name, "--job.dump_folder", str(dump),
        "--training.seq_len", str(plan.seq_len), "--training.local_batch_size", str(shape.batch),
        "--training.steps", str(plan.steps), "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard",
        "--activation_checkpoint.mode", ac,
    ]  # fmt: skip
    if "compile" in mode:
        args.append("--compile.enable")
    if "float8" in mode:
        args += ["--model.converters", "quantize.linear.float8"]
        args += ["--quantize.linear.float8.filter_fqns", "output"]
        args += ["--quantize.linear.float8.emulate"] if plan.dry_run else []
    return args


def child_cmd(kind: str, plan: Plan, shape: Shape, rest: list[str]) -> list[str]:
    """This file run as the child that registers the cut flavor, then trains."""
    head = [sys.executable]
    if kind == "torchtitan":  # torchtitan initialises a process group: one process, torchrun
        head += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    opts = ["--flavor", shape.flavor, "--n-layers", str(shape.n_layers or 0)]
    opts += ["--compile-backend", plan.compile_backend]
    return [*head, str(Path(__file__).resolve()), "--child", kind, *opts, "--", *rest]


def run_titan(plan: Plan, shape: Shape, mode: str, ctx: Context) -> Row:
    """One titan run; on running out of memory, once more with full activation checkpointing."""
    for ac in ("none", "full"):
        row = new_row("titan", plan, shape, mode, ac, ctx)
        dump = ctx.work / f"titan-{shape.label}-{mode}-{ac}".replace("+", "-")
        cmd = child_cmd("titan", plan, shape, titan_args(plan, shape, mode, ac, dump))
        log = read_run(row, cmd, dump, plan, ctx, titan_records)
        if ac == "none" and row.status == "failed" and "out of memory" in log.lower():
            say(f"  {shape.label} {mode}: out of memory without AC; again with AC full")
            continue
        row.note = "AC full: out of memory without AC" if ac == "full" else row.note
        return row
    raise AssertionError("unreachable")


def read_run(row: Row, cmd: list[str], dump: Path, plan: Plan, ctx: Context, parse) -> str:
    """Run ``cmd`` within the budget; fill ``row`` from ``parse(log, dump)``, the run's per-step
    records; return its log."""
    left = ctx.seconds_left()
    if left < 10:
        row.status, row.note = "skipped", "time budget spent (--budget-s)"
        return ""
    dump.mkdir(parents=True, exist_ok=True)
    log_path = dump.parent / f"{dump.name}.log"
    start = time.perf_counter()
    rc = run_logged(cmd, ctx.env, min(plan.run_timeout_s, left), log_path)
    row.wall_s = round(time.perf_counter() - start, 1)
    log = log_path.read_text(errors="replace")
    records = parse(log, dump)
    fill_row(row, records, plan.warmup)
    peak = re.search(r"MFU is measured against (\S+) FLOP/s \((.*)\)", log)
    row.mfu_peak = f"{peak.group(1)} FLOP/s: {peak.group(2)}" if peak else ""
    row.status = "ok" if rc == 0 and records else ("timeout" if rc is None else "failed")
    if row.status != "ok":
        row.note = row.note or last_error(log)
        tail = "\n".join(f"    {line}" for line in log.splitlines()[-15:])
        say(f"  log: {log_path}\n{tail}")
    return log


def titan_records(log: str, dump: Path) -> list[dict]:
    """The trainer's metrics.jsonl: one record per step (``metrics.log_freq`` 1)."""
    path = dump / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def fill_row(row: Row, records: list[dict], warmup: int) -> None:
    """Medians over the steps after ``warmup`` of the trainer's own tps, tflops and mfu (one
    constant apart within a run, so the three medians are the same step's); the run's peak
    memory; the last step's loss."""
    if not records:
        return
    timed = [r for r in records if r["step"] > warmup] or records[-1:]
    row.tokens_per_s = statistics.median(r["tps"] for r in timed)
    row.tflops = statistics.median(r["tflops"] for r in timed)
    row.mfu = statistics.median(r["mfu"] for r in timed)
    row.memory_gib = max(r["memory_gib"] for r in records)
    row.loss, row.steps = records[-1]["loss"], records[-1]["step"]


def last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if "Error" in line or "error:" in line]
    return lines[-1].strip()[:200] if lines else "see its log"


def run_torchtitan(plan: Plan, shape: Shape, mode: str, ctx: Context) -> Row:
    """torchtitan's llama3 on the same shape, batch, steps and data (see gpu_torchtitan.py)."""
    row = new_row("torchtitan", plan, shape, mode, "none", ctx)
    dump = ctx.work / f"torchtitan-{shape.label}-{mode}".replace("+", "-")
    dump.mkdir(parents=True, exist_ok=True)
    toml = dump.parent / f"{dump.name}.toml"
    flavor = f"titan-{shape.flavor_name}"
    toml.write_text(
        gpu_torchtitan.job_toml(flavor, shape.batch, plan.seq_len, plan.steps, mode, dump,
                                ctx.assets)
    )  # fmt: skip
    cmd = child_cmd("torchtitan", plan, shape, ["--job.config_file", str(toml)])
    read_run(row, cmd, dump, plan, ctx, gpu_torchtitan.records)
    row.note = row.note or "memory: max reserved"
    return row


# ---- the children --------------------------------------------------------------------------


def cut_flavor(flavor: str, n_layers: int):
    """titan's llama3 args of ``flavor``, with ``n_layers`` blocks when that is not 0."""
    from titan_llama3.args import LLAMA3_FLAVORS

    args = LLAMA3_FLAVORS[flavor]
    return dataclasses.replace(args, n_layers=n_layers) if n_layers else args


def use_compile_backend(backend: str) -> None:
    """NOTE: the dry run compiles with another backend than inductor (dynamo and AOTAutograd
    trace the same graphs, but inductor's C++ code generation takes ~2 minutes on 2 CPU cores);
    titan's compile pass calls ``torch.compile`` without a backend, so the default is swapped."""
    import torch

    if backend != "inductor":
        torch.compile = functools.partial(torch.compile, backend=backend)


def register_cut_flavors(shapes: list[tuple[str, int]]) -> None:
    """Register llama3 in this process (no install needed) with each ``(flavor, n_layers)`` as a
    flavor named like :attr:`Shape.flavor_name`."""
    from titan_core.train_spec import register_train_spec
    from titan_llama3 import train_spec

    cut = {Shape("", f, n or None).flavor_name: cut_flavor(f, n) for f, n in shapes}
    register_train_spec(dataclasses.replace(train_spec, flavors={**train_spec.flavors, **cut}))


def titan_child(flavor: str, n_layers: int, rest: list[str]) -> int:
    """titan-train on the cut flavor."""
    from titan_core.train import main

    register_cut_flavors([(flavor, n_layers)])
    return main(rest)


def child_main(argv: list[str]) -> int:
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="bench_gpu.py --child")
    parser.add_argument("kind", choices=["titan", "torchtitan"])
    parser.add_argument("--flavor", required=True)
    parser.add_argument("--n-layers", type=int, default=0)
    parser.add_argument("--compile-backend", default="inductor")
    opts = parser.parse_args(argv[:split])
    use_compile_backend(opts.compile_backend)
    rest = argv[split + 1 :]
    if opts.kind == "titan":
        return titan_child(opts.flavor, opts.n_layers, rest)
    name = "titan-" + Shape("", opts.flavor, opts.n_layers or None).flavor_name
    return gpu_torchtitan.train(name, cut_flavor(opts.flavor, opts.n_layers), rest)


# ---- set-up, report ------------------------------------------------------------------------


@dataclass
class Context:
    """Where an invocation writes, its children's environment, its deadline, its results."""

    env: dict
    work: Path
    assets: Path
    deadline: float
    on_gpu: bool
    results: dict
    out: Path

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        """Written after every run, so a budget or a timeout still leaves the numbers."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        tmp.replace(self.out)


def new_row(trainer: str, plan: Plan, shape: Shape, mode: str, ac: str, ctx: Context) -> Row:
    total = cut_flavor(shape.flavor, 0).n_layers
    layers = f"{shape.n_layers} of {total}" if shape.n_layers else str(total)
    precision = "bf16" if ctx.on_gpu else "fp32"
    return Row(trainer, shape.label, layers, mode, precision, ac, plan.seq_len, shape.batch)


def install_wheels(env: dict) -> str:
    """Install the carried ``.whl/*.whl`` (no index, no dependencies) into SITE, put it first on
    the children's PYTHONPATH, and the titan packages (editable, no index) if llama3 is not
    registered: test_gpu.py runs ``python -m titan_core.train``, which finds models by entry
    point."""
    notes = []
    wheels = sorted(str(p) for p in WHEEL_DIR.glob("*.whl"))
    if wheels:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        cmd = [*pip, "--no-compile", "--upgrade", "--target", str(SITE), *wheels]
        subprocess.run(cmd, check=True, cwd=REPO)
        sys.path.insert(0, str(SITE))
        env["PYTHONPATH"] = os.pathsep.join([str(SITE), env["PYTHONPATH"]])
        notes.append(f"installed {len(wheels)} wheels from .whl/ into {SITE}")
    if not any(ep.name == "llama3" for ep in entry_points(group="titan.models")):
        editable = [arg for name in PACKAGES for arg in ("-e", str(REPO / "packages" / name))]
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        proc = subprocess.run([*pip, "--no-build-isolation", *editable], cwd=REPO)
        notes.append("installed the titan packages (editable)" if proc.returncode == 0 else
                     "could not install the titan packages: test_gpu.py will fail")  # fmt: skip
    return "; ".join(notes)


def run_gpu_tests(plan: Plan, ctx: Context) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    log = ctx.work / "test_gpu.log"
    start = time.perf_counter()
    rc = run_logged(cmd, ctx.env, min(plan.tests_timeout_s, ctx.seconds_left()), log)
    text = log.read_text(errors="replace")
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", text, re.M)
    summary = found[-1] if found else ("timed out" if rc is None else "no summary")
    if rc not in (0, None):
        say(f"  log: {log}\n" + "\n".join(text.splitlines()[-20:]))
    wall = round(time.perf_counter() - start, 1)
    return {"command": "pytest tests/test_gpu.py", "returncode": rc, "summary": summary,
            "wall_s": wall}  # fmt: skip


# ---- main ----------------------------------------------------------------------------------


def print_wheels() -> None:
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    download = (
        "python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
        f"--implementation cp {platforms} -d .whl"
    )
    print("The GPU machine (Python 3.12, PyTorch 2.11, no package registry) lacks:")
    print(f"  required: {' '.join(REQUIRED_WHEELS)}  (Float8; built for torch 2.11)")
    print(f"  optional, for the torchtitan comparison: {' '.join(gpu_torchtitan.WHEELS)}")
    print("Fetch them here, into the repo's git-ignored .whl/ folder:")
    print(f"  {download} {' '.join(REQUIRED_WHEELS)}")
    print(f"  {download} {' '.join(gpu_torchtitan.WHEELS)}   # optional")
    print("Carry .whl to the GPU machine; this script installs .whl/*.whl there by itself:")
    print("  PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py --out $OUT")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, same path")
    parser.add_argument("--print-wheels", action="store_true", help="wheels to carry; exit")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="JSON folder")
    parser.add_argument("--shapes", default="", help="comma-separated labels (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--seq-len", type=int, default=0, help="default 8192 (128 dry)")
    parser.add_argument("--steps", type=int, default=0, help="steps per run (12; 4 dry)")
    parser.add_argument("--budget-s", type=float, default=470, help="whole invocation")
    parser.add_argument("--run-timeout-s", type=float, default=150, help="one run at most")
    parser.add_argument("--skip-tests", action="store_true", help="do not run test_gpu.py")
    parser.add_argument("--compile-backend", default="", help="inductor (GPU); eager (dry)")
    parser.add_argument("--torchtitan-modes", default="compile", help="modes torchtitan runs")
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    dry = args.dry_run
    shapes = DRY_SHAPES if dry else GPU_SHAPES
    labels = [s.label for s in shapes]
    wanted = args.shapes.split(",") if args.shapes else labels
    if unknown := set(wanted) - set(labels):
        raise SystemExit(f"--shapes: unknown {sorted(unknown)}; pick from {labels}")
    shapes = tuple(s for s in shapes if s.label in wanted)
    modes = tuple(args.modes.split(","))
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; pick from {list(MODES)}")
    steps = args.steps or (4 if dry else 12)
    return Plan(
        dry_run=dry, shapes=shapes, modes=modes, seq_len=args.seq_len or (128 if dry else 8192),
        steps=steps, warmup=steps // 3, compile_backend=args.compile_backend or
        ("eager" if dry else "inductor"), budget_s=args.budget_s,
        run_timeout_s=args.run_timeout_s, tests_timeout_s=120 if dry else 200,
        run_tests=not args.skip_tests,
        torchtitan_modes=tuple(m for m in args.torchtitan_modes.split(",") if m),
    )  # fmt: skip


def device_name(on_gpu: bool) -> str:
    """The GPU's name from nvidia-smi: this process never initialises CUDA (its context would
    take GPU memory from the runs)."""
    if not on_gpu or not shutil.which("nvidia-smi"):
        return "CUDA GPU" if on_gpu else f"CPU ({os.cpu_count()} cores)"
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    out = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "CUDA GPU"


def make_context(plan: Plan, out_dir: Path, start: float) -> Context:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not plan.dry_run:
        raise SystemExit("bench_gpu.py: no CUDA device here; on a machine without a GPU run "
                         "`python bench/bench_gpu.py --dry-run` (tiny shapes on CPU)")  # fmt: skip
    path = os.pathsep.join([*SRC_DIRS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_DATASETS_OFFLINE": "1"}
    notes = "" if plan.dry_run else install_wheels(env)
    from titan_core.data.embedded import embedded_assets_dir

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = device_name(on_gpu)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40]
    out = out_dir / (f"dry-run-{stamp}.json" if plan.dry_run else f"gpu-{slug}-{stamp}.json")
    results = {
        "device": name, "torch": torch.__version__, "date": stamp, "dry_run": plan.dry_run,
        "seq_len": plan.seq_len, "steps": plan.steps,
        "timed_steps": f"median of steps {plan.warmup + 1}-{plan.steps}",
        "compile_backend": plan.compile_backend, "setup": notes, "tests": None, "rows": [],
        "torchtitan": "", "ratios": [], "planner": "",
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="titan-bench-"))
    deadline = start + plan.budget_s
    return Context(env, work, embedded_assets_dir(), deadline, on_gpu, results, out)


def report_row(ctx: Context, row: Row) -> None:
    ctx.results["rows"].append(dataclasses.asdict(row))
    ctx.save()
    what = " ".join(f"{c}={v}" for c, v in zip(COLUMNS, cells(row), strict=True))
    say(f"  {what}  ({row.wall_s:.0f} s)" + (f"  [{row.note}]" if row.note else ""))


def start_predictions(plan: Plan, ctx: Context) -> gpu_plan.Predictions:
    """titan-plan on every configuration a titan run may take, in a child of its own."""
    device = gpu_plan.planner_device(ctx.results["device"], ctx.on_gpu)
    ctx.results["planner"] = f"titan-plan --gpu {device}" if device else "no titan-plan entry"
    jobs = [
        {"key": gpu_plan.job_key(shape.label, mode, ac), "flavor": shape.flavor,
         "n_layers": shape.n_layers or 0,
         "argv": titan_args(plan, shape, mode, ac, ctx.work / "planned")}
        for shape in plan.shapes for mode in plan.modes for ac in gpu_plan.PLANNED_AC
    ]  # fmt: skip
    return gpu_plan.start(jobs, device, ctx.work, ctx.env)


def run_all(plan: Plan, ctx: Context) -> list[Row]:
    tt_why = gpu_torchtitan.status(ctx.on_gpu)
    ctx.results["torchtitan"] = tt_why or "installed: compared on " + ",".join(
        plan.torchtitan_modes
    )
    rows = []
    for shape in plan.shapes:
        for mode in plan.modes:
            say(f"[{time.strftime('%H:%M:%S')}] titan {shape.label} {mode}")
            rows.append(run_titan(plan, shape, mode, ctx))
            report_row(ctx, rows[-1])
            if not tt_why and mode in plan.torchtitan_modes:
                say(f"[{time.strftime('%H:%M:%S')}] torchtitan {shape.label} {mode}")
                rows.append(run_torchtitan(plan, shape, mode, ctx))
                report_row(ctx, rows[-1])
    return rows


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.print_wheels:
        print_wheels()
        return 0
    start = time.monotonic()
    plan = build_plan(args)
    sys.path[:0] = SRC_DIRS  # the packages' sources, installed or not
    ctx = make_context(plan, Path(args.out), start)
    r = ctx.results
    say(f"{r['device']}, torch {r['torch']}; runs in {ctx.work}; results -> {ctx.out}")
    if r["setup"]:
        say(f"setup: {r['setup']}")
    predictions = start_predictions(plan, ctx)  # on CPU, while the tests run
    if plan.run_tests:
        say(f"[{time.strftime('%H:%M:%S')}] pytest tests/test_gpu.py")
        r["tests"] = run_gpu_tests(plan, ctx)
        say(f"  tests/test_gpu.py: {r['tests']['summary']} ({r['tests']['wall_s']:.0f} s)")
        ctx.save()
    # NOTE: the planner finishes before the timed runs start, so it cannot slow them (it
    # takes about 30 s on 2 cores, usually within the tests' time).
    planned = predictions.collect(min(PLAN_TIMEOUT_S, ctx.seconds_left()))
    rows = run_all(plan, ctx)
    r["ratios"] = ratios(rows)
    gpu_plan.apply(rows, planned, predictions.why_not, ctx.on_gpu)
    r["rows"] = [dataclasses.asdict(row) for row in rows]
    ctx.save()
    print_summary(plan, ctx, rows, time.monotonic() - start)
    tests_ok = r["tests"] is None or r["tests"]["returncode"] == 0
    if tests_ok and all(row.status == "ok" for row in rows if row.trainer == "titan"):
        shutil.rmtree(ctx.work, ignore_errors=True)
        return 0
    say(f"not every run finished: their logs are in {ctx.work}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

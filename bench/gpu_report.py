"""``bench_gpu.py``'s results: one row per run, the table, titan / torchtitan ratios, and the
measured numbers beside titan-plan's prediction of the same config."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

say = functools.partial(print, flush=True)


@dataclass
class Row:
    """One training run's result; ``None`` where it produced no number."""

    trainer: str
    shape: str
    layers: str
    mode: str
    precision: str
    ac: str
    seq_len: int
    batch: int
    status: str = "pending"
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    memory_gib: float | None = None
    loss: float | None = None
    steps: int = 0
    wall_s: float = 0.0
    mfu_peak: str = ""
    note: str = ""
    # titan-plan's prediction of the same config on this device (gpu_plan.py)
    plan_tokens_per_s: float | None = None
    plan_memory_gib: float | None = None
    plan_fits: bool | None = None
    plan_note: str = ""


COLUMNS = ("trainer", "shape", "layers", "batch x seq", "mode", "precision", "AC", "tokens/s",
           "TFLOP/s", "MFU", "peak mem (GiB)", "loss @ step", "status")  # fmt: skip


def cells(row: Row) -> list[str]:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    loss = "-" if row.loss is None else f"{row.loss:.4f} @ {row.steps}"
    return [
        row.trainer, row.shape, row.layers, f"{row.batch} x {row.seq_len}", row.mode,
        row.precision, row.ac, num(row.tokens_per_s, ",.0f"), num(row.tflops, ".3g"),
        num(row.mfu, ".1%"), num(row.memory_gib, ".2f"), loss, row.status,
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    lines += [f"| {' | '.join(cells(row))} |" for row in rows]
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    """titan / torchtitan tokens/s and TFLOP/s for each configuration both ran."""
    ok = {(r.trainer, r.shape, r.mode): r for r in rows if r.status == "ok"}
    pairs = [(ok.get(("titan", s, m)), tt) for (t, s, m), tt in ok.items() if t == "torchtitan"]
    return [
        f"{tt.shape} {tt.mode}: titan / torchtitan tokens/s {ours.tokens_per_s / tt.tokens_per_s:.2f}x"
        f", TFLOP/s {ours.tflops / tt.tflops:.2f}x"
        for ours, tt in pairs
        if ours is not None
    ]


PLAN_COLUMNS = ("shape", "mode", "AC", "tokens/s", "planned", "ratio", "peak mem (GiB)",
                "planned", "ratio", "plan says", "note")  # fmt: skip


def plan_cells(row: Row) -> list[str]:
    """A titan run against its plan; ratios are measured / planned."""

    def pair(measured: float | None, planned: float | None, fmt: str) -> list[str]:
        ratio = f"{measured / planned:.2f}" if measured and planned else "-"
        return [format(measured, fmt) if measured else "-",
                format(planned, fmt) if planned else "-", ratio]  # fmt: skip

    fits = {True: "fits", False: "does not fit", None: "-"}[row.plan_fits]
    return [
        row.shape, row.mode, row.ac, *pair(row.tokens_per_s, row.plan_tokens_per_s, ",.0f"),
        *pair(row.memory_gib, row.plan_memory_gib, ".2f"), fits, row.plan_note or row.status,
    ]  # fmt: skip


def plan_table(rows: list[Row]) -> str:
    lines = [f"| {' | '.join(PLAN_COLUMNS)} |", f"|{'---|' * len(PLAN_COLUMNS)}"]
    lines += [f"| {' | '.join(plan_cells(row))} |" for row in rows if row.trainer == "titan"]
    return "\n".join(lines)


def print_summary(plan: Any, ctx: Any, rows: list[Row], took: float) -> None:
    """The closing report: the table, MFU's peak, the torchtitan ratios, the plan's check."""
    r = ctx.results
    say("")
    say(f"{r['device']}, torch {r['torch']}, seq_len {plan.seq_len}, {plan.steps} steps per "
            f"run ({r['timed_steps']}), compile backend {plan.compile_backend}")  # fmt: skip
    if r["tests"]:
        say(f"tests/test_gpu.py: {r['tests']['summary']}")
    say(table(rows))
    peaks = sorted({row.mfu_peak for row in rows if row.mfu_peak})
    say("MFU is the trainer's own (metrics.jsonl), against " + ("; ".join(peaks) or "-"))
    say(f"torchtitan: {r['torchtitan']}")
    for line in r["ratios"]:
        say(f"  {line}")
    if any(row.trainer == "torchtitan" and row.shape in ("1B", "3B") for row in rows):
        say("  (torchtitan's llama3 never ties embeddings: its 1B and 3B carry an untied output "
            "layer, so compare TFLOP/s as well as tokens/s)")  # fmt: skip
    say("")
    say(f"titan-plan for the same configs on this device ({r['planner']}):")
    say(plan_table(rows))
    say(f"took {took:.0f} s; results: {ctx.out}")

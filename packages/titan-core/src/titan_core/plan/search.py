"""``titan-plan --search``: the layouts that fit a target, fastest first.

Every candidate (dp_shard, dp_replicate, tp, pp, cp, ep, AC mode, local batch, Float8) that
titan-train's own checks accept is costed by the time model (cheap), then probed for memory
(seconds each) in order of estimated tokens/s until ``top`` of them fit (see :func:`search`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from collections.abc import Iterator

from titan_core.config import JobConfig
from titan_core.errors import UserError
from titan_core.plan.cost import step_cost
from titan_core.plan.devices import GIB
from titan_core.plan.memory import Progress
from titan_core.plan.planner import Plan, Target, check_layout, for_target, plan_layout
from titan_core.plan.report import as_json, layout, parallelism_toml

BATCHES = (1, 2, 4, 8, 16)
# Context parallel only where each rank keeps at least this many positions of the sequence
# (below it, CP's K/V exchange outweighs what it saves; torchtitan uses CP from 32k tokens).
MIN_CP_POSITIONS = 4096
# The search stops once the layouts found are within this fraction of the best estimate left
# unvisited: the time model does not rank closer than that.
RANK_TOLERANCE = 0.02
AC_ORDER = ("none", "selective", "full")  # most to least activation memory
MAX_NODES = 4096


# Bytes per parameter a device keeps whatever the batch: fp32 weights, gradients and AdamW's
# two states, sharded over every dimension but dp_replicate. Used only to skip probing
# layouts that cannot fit; reported numbers always come from a probe.
STATE_BYTES_PER_PARAM = 16


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout to try, with its estimated tokens/s per device and the memory its weights,
    gradients and optimizer state need at the least (GiB, before any activation)."""

    config: JobConfig
    tokens_per_s: float
    state_gib: float

    @property
    def key(self) -> tuple:
        p, t = self.config.parallelism, self.config.training
        return (
            p.data_parallel_replicate_degree, p.data_parallel_shard_degree,
            p.tensor_parallel_degree, p.pipeline_parallel_degree, p.context_parallel_degree,
            p.expert_parallel_degree, "quantize.linear.float8" in self.config.model.converters,
            self.config.activation_checkpoint.mode, t.local_batch_size,
        )  # fmt: skip


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def layouts(config: JobConfig, target: Target) -> Iterator[JobConfig]:
    """Every combination of the searched knobs, as configs (unchecked)."""
    world, per_node = target.world_size, target.per_node
    float8 = (False, True) if target.device.fp8_flops else (False,)
    args = check_layout(for_target(config, target), target).model_args
    moe = getattr(args, "moe", None) is not None
    for tp, cp, pp in itertools.product(_divisors(per_node, 8), (1, 2, 4), _divisors(world, 64)):
        if world % (tp * cp * pp):
            continue
        rest = world // (tp * cp * pp)
        replicas = {1, target.nodes} if rest % target.nodes == 0 else {1}
        for rep, f8, ac, batch in itertools.product(replicas, float8, AC_ORDER, BATCHES):
            if rest % rep:
                continue
            for ep in _divisors(rest // rep * cp * tp, 64) if moe else (1,):
                yield _variant(config, rep, rest // rep, tp, pp, cp, ep, f8, ac, batch)


def _variant(
    config: JobConfig, rep: int, shard: int, tp: int, pp: int, cp: int, ep: int,
    float8: bool, ac: str, batch: int,
) -> JobConfig:  # fmt: skip
    c = copy.deepcopy(config)
    p = c.parallelism
    p.data_parallel_replicate_degree, p.data_parallel_shard_degree = rep, shard
    p.tensor_parallel_degree, p.pipeline_parallel_degree = tp, pp
    p.context_parallel_degree, p.expert_parallel_degree = cp, ep
    p.pipeline_parallel_layers_per_stage = None
    c.activation_checkpoint.mode = ac
    if ac == "selective":
        c.activation_checkpoint.selective_ac_option = "op"
    c.training.local_batch_size = batch
    converters = [x for x in c.model.converters if x != "quantize.linear.float8"]
    c.model.converters = [*converters, "quantize.linear.float8"] if float8 else converters
    return c


def candidates(config: JobConfig, target: Target) -> list[Candidate]:
    """The layouts titan-train accepts, costed, fastest first."""
    from titan_core.plan.cost import model_shape

    planned = for_target(config, target)
    found, shape = [], None
    for c in layouts(planned, target):
        try:
            checked = check_layout(c, target)
        except UserError:
            continue
        if shape is None:
            shape = model_shape(checked.spec, checked.model_args, c.training.seq_len)
        cost = step_cost(shape, c, checked.dims, target.device, target.per_node)
        d = checked.dims
        shards = d.dp_shard * d.cp * d.tp * d.pp
        state = shape.params * STATE_BYTES_PER_PARAM / shards / GIB
        found.append(Candidate(c, cost.tokens_per_s, state))
    return sorted(found, key=lambda x: -x.tokens_per_s)


def search(
    config: JobConfig, target: Target, top: int, progress: Progress | None = None
) -> tuple[list[Plan], int, int]:
    """The ``top`` fastest layouts that fit, one per layout family (everything but the local
    batch, at its largest batch that fits); also how many were considered and probed.

    Layouts whose weights, gradients and optimizer state alone exceed the device are dropped
    unprobed. Families are visited fastest first (by their largest batch's estimate), and the
    search stops once ``top`` found layouts beat every family not yet visited (within
    :data:`RANK_TOLERANCE`). A layout is
    first probed at its least memory (full AC, smallest batch): if that does not fit, none of
    its AC modes and batches do. Within a family memory grows with the batch, so the largest
    batch that fits is found by bisection. Every layout reported was probed.
    """
    every = candidates(config, target)
    ranked = [c for c in every if c.state_gib <= target.device.usable_gib]
    families: dict[tuple, list[Candidate]] = {}
    for cand in ranked:  # fastest first, so each family's first member is its upper bound
        families.setdefault(cand.key[:-1], []).append(cand)
    prober = _Prober(target, progress)
    floors: dict[tuple, bool] = {}  # layout (AC and batch aside) -> fits at full AC, batch 1
    fitting: list[Plan] = []
    for family in families.values():
        bound = family[0].tokens_per_s * (1 - RANK_TOLERANCE)
        if len(fitting) == top and fitting[-1].cost.tokens_per_s >= bound:
            break
        floor = family[0].key[:-2]
        if floor not in floors:
            floors[floor] = _fits(prober.plan(_floor(family[0], families)))
        best = _largest_batch_that_fits(family, prober) if floors[floor] else None
        if best is not None:
            fitting = sorted([*fitting, best], key=lambda p: -p.cost.tokens_per_s)[:top]
    return fitting, len(every), prober.count


class _Prober:
    """Plans layouts once each; a failing probe skips its layout with a line saying why."""

    def __init__(self, target: Target, progress: Progress | None) -> None:
        self.target, self.progress = target, progress
        self.plans: dict[tuple, Plan | None] = {}

    @property
    def count(self) -> int:
        return len(self.plans)

    def plan(self, cand: Candidate) -> Plan | None:
        if cand.key not in self.plans:
            n = self.count + 1
            try:
                plan = plan_layout(cand.config, self.target, all_ac=False)
            except Exception as e:  # one layout's failure must not end the search
                _skip(self.progress, cand, e)
                plan = None
            self.plans[cand.key] = plan
            if plan is not None and self.progress is not None:
                verdict = "fits" if plan.fits else "does not fit"
                self.progress(
                    f"probe {n}: {_short(cand.config)}: {plan.memory_gib:.1f} GiB, {verdict}"
                )
        return self.plans[cand.key]


def _largest_batch_that_fits(family: list[Candidate], prober: _Prober) -> Plan | None:
    """Bisection over the family's batches (memory grows with the batch)."""
    by_batch = sorted(family, key=lambda c: c.key[-1])
    lo, hi, best = 0, len(by_batch) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = prober.plan(by_batch[mid])
        if _fits(plan):
            best, lo = plan, mid + 1
        else:
            hi = mid - 1
    return best


def _fits(plan: Plan | None) -> bool:
    return plan is not None and plan.fits


def _floor(cand: Candidate, families: dict[tuple, list[Candidate]]) -> Candidate:
    """The least memory ``cand``'s layout can take: full AC at its smallest batch (if full AC
    does not fit there, no AC mode and no batch does)."""
    *layout_key, _, _ = cand.key
    full = [c for key, group in families.items() if key[:-1] == tuple(layout_key)
            and key[-1] == "full" for c in group]  # fmt: skip
    return min(full or [cand], key=lambda c: c.key[-1])


def _skip(progress: Progress | None, cand: Candidate, error: Exception) -> None:
    """Say which layout's probe failed and why, in one line, and go on."""
    if progress is not None:
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        progress(f"skipped {_short(cand.config)}: its probe failed ({reason})")


def _short(config: JobConfig) -> str:
    k = layout(config)
    return (
        f"dp_rep {k['data_parallel_replicate_degree']} dp_shard {k['data_parallel_shard_degree']}"
        f" tp {k['tensor_parallel_degree']} pp {k['pipeline_parallel_degree']}"
        f" cp {k['context_parallel_degree']} ep {k['expert_parallel_degree']}"
        f" AC {k['activation_checkpoint']} batch {k['local_batch_size']}"
        f" float8 {'on' if k['float8'] else 'off'}"
    )


def smallest_fit(config: JobConfig, target: Target, progress: Progress | None) -> str:
    """The fewest nodes (doubling) on which the most memory-frugal layout fits, or why none."""
    nodes = target.nodes * 2
    while nodes <= MAX_NODES:
        bigger = Target(target.device, nodes, target.per_node)
        frugal = [c for c in candidates(config, bigger) if _frugal(c.config)]
        frugal.sort(key=lambda c: -c.config.parallelism.tensor_parallel_degree)
        for cand in frugal[:1]:
            if progress is not None:
                progress(f"{nodes} nodes: {_short(cand.config)}")
            if plan_layout(cand.config, bigger, all_ac=False).fits:
                return f"the smallest that fits: {nodes} nodes x {target.per_node}, {_short(cand.config)}"
        nodes *= 2
    return f"nothing fits up to {MAX_NODES} nodes"


def _frugal(c: JobConfig) -> bool:
    """Batch 1, full AC, no replication: the least memory a world size offers."""
    p = c.parallelism
    return (
        c.training.local_batch_size == 1
        and p.pipeline_parallel_degree <= 8
        and c.activation_checkpoint.mode == "full"
        and p.data_parallel_replicate_degree == 1
        and p.context_parallel_degree == 1
        and "quantize.linear.float8" not in c.model.converters
    )


def print_search(
    config: JobConfig, target: Target, top: int, as_json_out: bool, progress: Progress | None
) -> int:
    """Run the search and print it; no fitting layout is a one-line UserError naming the
    smallest target that would fit."""
    plans, considered, probed = search(config, target, top, progress)
    if not plans:
        c = config.model
        where = f"{target.nodes} node(s) x {target.per_node} {target.device.name}"
        raise UserError(
            f"no layout of {c.name} {c.flavor} fits {where} "
            f"({considered} layouts considered, {probed} probed); "
            + smallest_fit(config, target, progress)
        )
    if as_json_out:
        out = {"considered": considered, "probed": probed, "layouts": [as_json(p) for p in plans]}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{considered} layouts considered, {probed} probed; the {len(plans)} fastest that fit:")
    for i, plan in enumerate(plans, 1):
        print(
            f"\n#{i}: {plan.cost.tokens_per_s:,.0f} tokens/s per device, MFU {100 * plan.mfu:.1f}%,"
            f" {plan.memory_gib:.1f} of {target.device.memory_gib:.1f} GiB"
        )
        print(parallelism_toml(layout(plan)))
    return 0

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
from titan_core.plan.memory import Progress
from titan_core.plan.planner import Plan, Target, check_layout, for_target, plan_layout
from titan_core.plan.report import as_json, layout, parallelism_toml

BATCHES = (1, 2, 4, 8, 16, 32)
AC_ORDER = ("none", "selective", "full")  # most to least activation memory
MAX_NODES = 4096


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout to try, with its estimated tokens/s per device."""

    config: JobConfig
    tokens_per_s: float

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
        found.append(Candidate(c, cost.tokens_per_s))
    return sorted(found, key=lambda x: -x.tokens_per_s)


def search(
    config: JobConfig, target: Target, top: int, progress: Progress | None = None
) -> tuple[list[Plan], int, int]:
    """The ``top`` fastest layouts that fit; also how many were considered and probed.

    A layout family (everything but the local batch) is probed at its two smallest batches
    first; activation memory grows linearly with the batch, so that screens every larger
    batch. A layout is reported only after a probe of its own confirms that it fits.
    """
    ranked = candidates(config, target)
    fitting: list[Plan] = []
    screens: dict[tuple, tuple[int, float, int, float]] = {}
    plans: dict[tuple, Plan] = {}

    def probe(cand: Candidate) -> Plan:
        if cand.key not in plans:
            if progress is not None:
                progress(f"probe {len(plans) + 1}: {_short(cand.config)}")
            plans[cand.key] = plan_layout(cand.config, target, all_ac=False)
        return plans[cand.key]

    batches = {}
    for cand in ranked:
        batches.setdefault(cand.key[:-1], []).append(cand)
    for cand in ranked:
        if len(fitting) == top:
            break
        family = cand.key[:-1]
        if family not in screens:
            smallest = sorted(batches[family], key=lambda x: x.key[-1])[:2]
            sizes = [(x.key[-1], probe(x).memory_gib) for x in smallest]
            screens[family] = (*sizes[0], *sizes[-1])
        b1, m1, b2, m2 = screens[family]
        b = cand.key[-1]
        estimate = m1 if b2 == b1 else m1 + (m2 - m1) * (b - b1) / (b2 - b1)
        if estimate > target.device.memory_gib:
            continue
        plan = probe(cand)
        if plan.fits:
            fitting.append(plan)
    return fitting, len(ranked), len(plans)


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

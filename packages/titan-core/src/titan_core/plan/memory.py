"""Per-device memory of a layout: the probe run on every distinct rank, deep models by depth.

Ranks of one pipeline stage hold the same shards of the same blocks, so one rank per pipeline
stage group is probed (rank ``k * world / pp`` for stage group ``k``; ``pp`` is the outermost
mesh dimension). Each probe runs in a forked child: a fake process group can be set up once per
process, and children run two at a time.

Deep models are probed at two reduced depths and extrapolated: every block of a decoder is the
same module with the same shapes, so parameters, gradients, optimizer state and the activations
a step keeps grow by the same amount per block. The probes give every pipeline stage one and
two blocks (``d + 1`` and ``d + 2`` blocks without PP, ``d`` the leading dense blocks of an
MoE model); each rank is then extrapolated to the blocks its stages hold at full depth.
With PP the dense blocks are counted as ordinary blocks of the first stage (an approximation
for DeepSeek-style models; exact for dense and all-MoE models).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable
from typing import Any

from titan_core.config import JobConfig
from titan_core.errors import UserError
from titan_core.parallel.pipeline import layer_split, stage_ids
from titan_core.plan.probe import StepMemory, probe_rank

Progress = Callable[[str], None]

# Full depth is probed when it is at most this many blocks per stage past the dense ones.
FULL_DEPTH_BLOCKS_PER_STAGE = 3


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Peak step memory of each probed rank, and how its depth was reached.

    Args:
        per_rank: rank -> its peak, by category.
        depth: a sentence for the report ("probed at full depth", or the two depths).
    """

    per_rank: dict[int, StepMemory]
    depth: str

    @property
    def worst(self) -> tuple[int, StepMemory]:
        """The rank with the largest peak, and its peak."""
        rank = max(self.per_rank, key=lambda r: self.per_rank[r].total)
        return rank, self.per_rank[rank]


def probed_ranks(world_size: int, pp: int) -> list[int]:
    """One rank per pipeline stage group: the first of each."""
    return [k * (world_size // pp) for k in range(pp)]


def probe_depths(args: Any, n_stages: int) -> tuple[int, int] | None:
    """The two reduced depths to probe (one and two blocks per stage), or None to probe the
    full depth (at most :data:`FULL_DEPTH_BLOCKS_PER_STAGE` blocks per stage)."""
    dense = leading_dense_blocks(args) if n_stages == 1 else 0
    if args.n_layers <= dense + FULL_DEPTH_BLOCKS_PER_STAGE * n_stages:
        return None
    return dense + n_stages, dense + 2 * n_stages


def blocks_per_stage(config: JobConfig, args: Any, n_stages: int, rank_in_pp: int) -> float:
    """The mean number of blocks of a pipeline rank's stages at full depth (past the dense
    prefix, without PP)."""
    if n_stages == 1:
        return args.n_layers - leading_dense_blocks(args)
    p = config.parallelism
    splits = layer_split(args.n_layers, n_stages, p.pipeline_parallel_layers_per_stage)
    ids = stage_ids(p.pipeline_parallel_schedule, p.pipeline_parallel_degree, rank_in_pp)
    return sum(len(splits[i]) for i in ids) / len(ids)


def leading_dense_blocks(args: Any) -> int:
    """Blocks before the first MoE block of an MoE model (0 for a dense model, whose blocks
    are all alike)."""
    is_moe = getattr(args, "is_moe_layer", None)
    if is_moe is None:
        return 0
    return next((i for i in range(args.n_layers) if is_moe(i)), 0)


def estimate_memory(
    config: JobConfig,
    world_size: int,
    args: Any,
    n_stages: int,
    progress: Progress | None = None,
) -> MemoryEstimate:
    """Probe every distinct rank of ``config``'s layout at ``world_size``.

    Args:
        config: the job config (its [parallelism] is the layout).
        world_size: devices in the job.
        args: the model args (for the depth and the dense prefix).
        n_stages: pipeline stages in all (``pp x`` stages per rank; 1 without PP).
        progress: called with one line per probe started.

    Raises:
        UserError: the layout is refused (from the probe, as titan-train refuses it).
    """
    pp = config.parallelism.pipeline_parallel_degree
    ranks = probed_ranks(world_size, pp)
    depths = probe_depths(args, n_stages)
    jobs = [(rank, depth) for rank in ranks for depth in (depths or (None,))]
    results = _run_probes(config, world_size, jobs, progress)
    if depths is None:
        per_rank = {rank: results[(rank, None)] for rank in ranks}
        return MemoryEstimate(per_rank, f"probed at full depth ({args.n_layers} blocks)")
    low, high = depths
    per_rank = {}
    for k, rank in enumerate(ranks):
        extra = blocks_per_stage(config, args, n_stages, k) - 1  # blocks past the first probe's
        per_rank[rank] = results[(rank, low)].blend(results[(rank, high)], extra)
    text = f"probed at {low} and {high} blocks, extrapolated to {args.n_layers}"
    return MemoryEstimate(per_rank, text)


def _run_probes(
    config: JobConfig,
    world_size: int,
    jobs: list[tuple[int, int | None]],
    progress: Progress | None,
) -> dict[tuple[int, int | None], StepMemory]:
    """Each (rank, depth) probe in a fresh forked child, two at a time."""
    context = multiprocessing.get_context("fork")
    workers = max(1, min(2, os.cpu_count() or 1, len(jobs)))
    with context.Pool(workers, maxtasksperchild=1) as pool:
        pending = {}
        for i, (rank, depth) in enumerate(jobs, 1):
            if progress is not None:
                blocks = "full depth" if depth is None else f"{depth} blocks"
                progress(f"probe {i}/{len(jobs)}: rank {rank} of {world_size}, {blocks}")
            args = (config, world_size, rank, depth)
            pending[(rank, depth)] = pool.apply_async(_probe_quietly, args)
        return {job: result.get() for job, result in pending.items()}


def _probe_quietly(
    config: JobConfig, world_size: int, rank: int, n_layers: int | None
) -> StepMemory:
    """The probe, in a child, without the trainer's build log and torch's warnings."""
    logging.getLogger("titan").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        return probe_rank(config, world_size, rank, n_layers)
    except UserError:
        raise
    except Exception as e:
        # NOTE: re-raised as plain text: torch's exceptions can hold C++ objects that the pool
        # cannot send back, which hid the cause behind a pickling error.
        why = f"{type(e).__name__}: {str(e).strip() or 'no message'}"
        raise RuntimeError(f"the memory probe of rank {rank} failed: {why}") from None

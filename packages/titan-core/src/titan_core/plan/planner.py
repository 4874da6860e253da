"""One layout's plan: memory from the probe, time from the cost model, for one target."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from titan_core.config import JobConfig
from titan_core.parallel.pipeline import stages_per_rank
from titan_core.plan.cost import ModelShape, StepCost, model_shape, step_cost
from titan_core.plan.devices import GIB, Device
from titan_core.plan.memory import MemoryEstimate, Progress, estimate_memory
from titan_core.plan.probe import ProbeTrainer, StepMemory

AC_MODES = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the job would run.

    Args:
        device: the device table entry.
        nodes: hosts.
        per_node: devices per host.
    """

    device: Device
    nodes: int
    per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything titan-plan reports for one config on one target.

    Args:
        config: the config as planned (mixed precision resolved for the target).
        target: the target.
        num_params: the model's parameters.
        memory: the probe's per-rank peaks.
        activations_by_ac: the worst rank's activation bytes under each AC mode (the
            configured one included).
        cost: the time model's step.
    """

    config: JobConfig
    target: Target
    num_params: int
    memory: MemoryEstimate
    activations_by_ac: dict[str, float]
    cost: StepCost

    @property
    def peak(self) -> StepMemory:
        return self.memory.worst[1]

    @property
    def memory_gib(self) -> float:
        """Device memory the job would hold at its peak: tensors over the allocator's
        efficiency, plus the runtime's reserve."""
        d = self.target.device
        return self.peak.total / GIB * d.allocator_factor + d.reserved_gib

    @property
    def fits(self) -> bool:
        return self.memory_gib <= self.target.device.memory_gib

    @property
    def mfu(self) -> float:
        return self.cost.mfu(self.target.device)


def for_target(config: JobConfig, target: Target) -> JobConfig:
    """``config`` with ``mixed_precision_param = "auto"`` resolved as titan-train resolves it on
    the target (bf16 on GPUs, fp32 on CPU)."""
    planned = copy.deepcopy(config)
    if planned.training.mixed_precision_param == "auto":
        cpu = target.device.name == "cpu"
        planned.training.mixed_precision_param = "float32" if cpu else "bfloat16"
    return planned


def check_layout(config: JobConfig, target: Target) -> ProbeTrainer:
    """titan-train's own checks of the config at the target's world size (a UserError in one
    line, before any probe runs); returns the checked (unbuilt) trainer."""
    return ProbeTrainer(copy.deepcopy(config), target.world_size, 0, None)


def plan_layout(
    config: JobConfig, target: Target, progress: Progress | None = None, all_ac: bool = True
) -> Plan:
    """Probe and cost ``config`` on ``target``.

    Args:
        config: the job config (TOML and flags, as titan-train takes them).
        target: where it would run.
        progress: called with a line per probe.
        all_ac: also probe the other AC modes' activations (the report's per-mode column).

    Raises:
        UserError: the layout cannot exist or titan-train would refuse it.
    """
    config = for_target(config, target)
    checked = check_layout(config, target)
    config.parallelism.data_parallel_shard_degree = checked.dims.dp_shard  # -1 resolved
    args, spec = checked.model_args, checked.spec
    n_stages = _n_stages(config)
    memory = estimate_memory(config, target.world_size, args, n_stages, progress)
    by_ac = {config.activation_checkpoint.mode: memory.worst[1].activations}
    if all_ac:
        for mode in AC_MODES:
            if mode not in by_ac:
                other = with_ac(config, mode)
                estimate = estimate_memory(other, target.world_size, args, n_stages, progress)
                by_ac[mode] = estimate.worst[1].activations
    shape = model_shape(spec, args, config.training.seq_len)
    cost = step_cost(shape, config, checked.dims, target.device, target.per_node)
    return Plan(config, target, shape.params, memory, by_ac, cost)


def shape_of(config: JobConfig, target: Target) -> tuple[ModelShape, Any]:
    """The model's shape for the time model, and the checked trainer (for its dims)."""
    checked = check_layout(for_target(config, target), target)
    return model_shape(checked.spec, checked.model_args, config.training.seq_len), checked


def with_ac(config: JobConfig, mode: str) -> JobConfig:
    """``config`` with activation checkpointing ``mode`` (selective: per op)."""
    other = copy.deepcopy(config)
    other.activation_checkpoint.mode = mode
    if mode == "selective":
        other.activation_checkpoint.selective_ac_option = "op"
    return other


def _n_stages(config: JobConfig) -> int:
    p = config.parallelism
    if p.pipeline_parallel_degree == 1:
        return 1
    return p.pipeline_parallel_degree * stages_per_rank(p.pipeline_parallel_schedule)

"""titan-plan's output: a readable report, one JSON object, and pasteable [parallelism] tables."""

from __future__ import annotations

from typing import Any

from titan_core.plan.devices import GIB
from titan_core.plan.planner import Plan
from titan_core.plan.probe import CATEGORIES


def layout(plan_or_config: Any) -> dict[str, Any]:
    """The planned layout's knobs, by name."""
    c = getattr(plan_or_config, "config", plan_or_config)
    p, t, ac = c.parallelism, c.training, c.activation_checkpoint
    return {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "data_parallel_shard_degree": p.data_parallel_shard_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "expert_parallel_degree": p.expert_parallel_degree,
        "activation_checkpoint": ac.mode
        + (f" ({ac.selective_ac_option})" if ac.mode == "selective" else ""),
        "local_batch_size": t.local_batch_size,
        "seq_len": t.seq_len,
        "float8": "quantize.linear.float8" in c.model.converters,
        "compile": c.compile.enable,
    }


def as_json(plan: Plan) -> dict[str, Any]:
    """The plan as one JSON-ready object (the keys docs/planning.md lists)."""
    rank, peak = plan.memory.worst
    d = plan.target.device
    cost = plan.cost
    return {
        "model": plan.config.model.name,
        "flavor": plan.config.model.flavor,
        "gpu": d.name,
        "nodes": plan.target.nodes,
        "gpus_per_node": plan.target.per_node,
        "world_size": plan.target.world_size,
        "layout": layout(plan),
        "num_params": plan.num_params,
        "memory_gib_per_device": plan.memory_gib,
        "device_memory_gib": d.memory_gib,
        "fits": plan.fits,
        "memory_breakdown_gib": {c: getattr(peak, c) / GIB for c in CATEGORIES},
        "tensor_peak_gib": peak.total / GIB,
        "allocator_factor": d.allocator_factor,
        "runtime_reserved_gib": d.reserved_gib,
        "activations_gib_by_ac_mode": {m: b / GIB for m, b in plan.activations_by_ac.items()},
        "worst_rank": rank,
        "peak_gib_by_rank": {r: m.total / GIB for r, m in plan.memory.per_rank.items()},
        "memory_method": plan.memory.depth,
        "flops_per_step_per_device": cost.flops,
        "comm_bytes_per_step": cost.comm_bytes,
        "exposed_comm_s": cost.exposed_s,
        "compute_s": cost.compute_s,
        "bubble_s": cost.bubble_s,
        "step_s": cost.step_s,
        "tokens_per_s_per_device": cost.tokens_per_s,
        "mfu": plan.mfu,
    }


def as_text(plan: Plan) -> str:
    """The plan for people: what was planned, memory by category, time by part."""
    j = as_json(plan)
    lay = j["layout"]
    c = plan.config
    lines = [
        f"titan-plan: {c.model.name} {c.model.flavor} on {j['nodes']} node(s) x "
        f"{j['gpus_per_node']} {j['gpu']} (world {j['world_size']})",
        "layout: " + ", ".join(f"{k} {v}" for k, v in lay.items()),
        f"parameters: {j['num_params']:,}",
        "",
        f"memory per device at the step's peak (worst rank {j['worst_rank']}; {j['memory_method']}):",
    ]
    for cat, gib in j["memory_breakdown_gib"].items():
        lines.append(f"  {cat:<13}{gib:9.2f} GiB")
    by_ac = ", ".join(f"{m} {g:.2f}" for m, g in j["activations_gib_by_ac_mode"].items())
    lines += [
        f"  activations by AC mode (GiB): {by_ac}",
        f"  tensors {j['tensor_peak_gib']:.2f} GiB x {j['allocator_factor']:.2f} allocator + "
        f"{j['runtime_reserved_gib']:.1f} GiB runtime = {j['memory_gib_per_device']:.2f} GiB of "
        f"{j['device_memory_gib']:.1f} GiB: {'fits' if j['fits'] else 'DOES NOT FIT'}",
        "",
        "time per step (per device):",
        f"  FLOPs          {j['flops_per_step_per_device']:.3g}",
        f"  compute        {j['compute_s']:.3f} s",
    ]
    for dim, nbytes in j["comm_bytes_per_step"].items():
        if nbytes:
            exposed = j["exposed_comm_s"][dim]
            lines.append(f"  comm {dim:<12}{nbytes / GIB:8.2f} GiB sent, {exposed:.3f} s exposed")
    lines += [
        f"  bubble         {j['bubble_s']:.3f} s",
        f"  step           {j['step_s']:.3f} s",
        f"  tokens/s       {j['tokens_per_s_per_device']:,.0f} per device",
        f"  MFU            {100 * j['mfu']:.1f}% of {plan.target.device.bf16_flops:.3g} FLOP/s",
    ]
    return "\n".join(lines)


def parallelism_toml(knobs: dict[str, Any]) -> str:
    """Ready-to-paste TOML for a layout (the sections it touches)."""
    p = [
        "[parallelism]",
        *(
            f"{k} = {knobs[k]}"
            for k in (
                "data_parallel_replicate_degree",
                "data_parallel_shard_degree",
                "tensor_parallel_degree",
                "pipeline_parallel_degree",
                "context_parallel_degree",
            )
        ),
    ]
    if knobs["expert_parallel_degree"] > 1:
        p.append(f"expert_parallel_degree = {knobs['expert_parallel_degree']}")
    mode, _, option = knobs["activation_checkpoint"].partition(" ")
    p += ["[activation_checkpoint]", f'mode = "{mode}"']
    if option:
        p.append(f'selective_ac_option = "{option.strip("()")}"')
    p += ["[training]", f"local_batch_size = {knobs['local_batch_size']}"]
    if knobs["float8"]:
        p += ["[model]", 'converters = ["quantize.linear.float8"]']
    return "\n".join(p)

"""Mixture of experts, shared by every MoE family: token-choice top-k routing (softmax or
sigmoid, group-limited, expert bias), grouped SwiGLU experts, shared experts, and the load
balancing that goes with them (auxiliary loss, expert-bias update).

Module names are a contract (TP/EP plans, FSDP, checkpoints and HF adapters key on them): an
MoE layer sits in a block as ``moe`` with ``router.gate``, ``experts.{w1,w2,w3}``,
``shared_experts.{w1,w2,w3}`` and the ``expert_bias`` buffer.
"""

from titan_core.models.moe.args import MoEArgs
from titan_core.models.moe.balance import load_balancing_loss, moe_layers, update_expert_bias
from titan_core.models.moe.experts import GroupedExperts, grouped_mm_supported
from titan_core.models.moe.layer import AuxStats, MoE, count_per_expert
from titan_core.models.moe.router import Routing, TokenChoiceRouter, limit_to_top_groups

__all__ = [
    "AuxStats",
    "GroupedExperts",
    "MoE",
    "MoEArgs",
    "Routing",
    "TokenChoiceRouter",
    "count_per_expert",
    "grouped_mm_supported",
    "limit_to_top_groups",
    "load_balancing_loss",
    "moe_layers",
    "update_expert_bias",
]

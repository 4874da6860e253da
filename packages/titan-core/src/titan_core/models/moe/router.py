"""Token-choice top-k routing: which experts each token goes to, and with what weight."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titan_core.models.moe.args import MoEArgs


class Routing(NamedTuple):
    """What the router decided for N tokens, all in fp32 but the indices.

    Attributes:
        logits: (N, E) the gate's raw outputs.
        scores: (N, E) softmax or sigmoid of the logits.
        weights: (N, K) each selected expert's weight: its unbiased score, renormalised if
            ``norm_topk_prob``, times ``route_scale``.
        experts: (N, K) int64, the selected experts.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor


def limit_to_top_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """``choice`` (N, E) with every expert outside each token's best ``topk_group`` groups set to
    -inf. A group's score is the sum of its two best experts' scores (DeepSeek V3).

    Args:
        choice: (N, E) selection scores (bias included).
        n_group: equal groups the E experts are split into, in order.
        topk_group: groups each token keeps.
    """
    groups = choice.unflatten(-1, (n_group, -1))  # (N, G, E/G)
    best_two = groups.topk(min(2, groups.shape[-1]), dim=-1).values
    kept = best_two.sum(-1).topk(topk_group, dim=-1).indices  # (N, topk_group)
    mask = torch.zeros(groups.shape[:2], dtype=torch.bool, device=choice.device)
    mask.scatter_(1, kept, True)
    return groups.masked_fill(~mask.unsqueeze(-1), float("-inf")).flatten(1)


def round_robin_experts(n: int, top_k: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """(N, K) experts dealt out in turn: slot ``k`` of token ``i`` gets ``(i K + k) % E``."""
    slots = torch.arange(n * top_k, device=device)
    return (slots % num_experts).view(n, top_k)


class TokenChoiceRouter(nn.Module):
    """Scores every expert for every token and picks each token's ``top_k``.

    The gate runs in the input's dtype; the scores, the selection and the weights are fp32. An
    expert bias, when given, shifts the selection only: the weights are the unbiased scores
    (auxiliary-loss-free load balancing, DeepSeek V3).

    Args:
        dim: model width.
        args: the layer's MoE arguments.
    """

    def __init__(self, dim: int, args: MoEArgs) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, args.num_experts, bias=False)
        self.args = args

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None) -> Routing:
        """Route ``x`` (N, dim); ``expert_bias`` (E,) fp32 or None."""
        args = self.args
        logits = self.gate(x).float()  # (N, E)
        if args.score_func == "softmax":
            scores = F.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        choice = scores if expert_bias is None else scores + expert_bias
        if args.n_group > 1:
            choice = limit_to_top_groups(choice, args.n_group, args.topk_group)
        if args.force_load_balance:
            experts = round_robin_experts(x.shape[0], args.top_k, args.num_experts, x.device)
        else:
            experts = choice.topk(args.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, experts)
        if args.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if args.route_scale != 1.0:
            weights = weights * args.route_scale
        return Routing(logits, scores, weights, experts)

    def init_weights(self, init_std: float) -> None:
        """The gate at ``init_std``, the block's depth-scaled std (as torchtitan's router)."""
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=init_std)

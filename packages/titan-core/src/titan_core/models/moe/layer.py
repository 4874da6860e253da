"""The mixture-of-experts layer: router, routed experts, optional shared experts."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from titan_core.models.feed_forward import FeedForward
from titan_core.models.moe.args import MoEArgs
from titan_core.models.moe.experts import GroupedExperts
from titan_core.models.moe.router import Routing, TokenChoiceRouter


class AuxStats(NamedTuple):
    """What one forward of one MoE layer contributes to the load-balancing loss.

    Attributes:
        selections: (E,) detached fp32, how many of the tokens' top-k of the softmax picked
            each expert.
        prob_sum: (E,) fp32 with gradient, the softmax probabilities summed over tokens.
        n_tokens: tokens routed.
    """

    selections: torch.Tensor
    prob_sum: torch.Tensor
    n_tokens: int


def _replaying() -> bool:
    """Whether this forward is activation checkpointing's replay during backward.

    NOTE: a replay must not count tokens again (the counts would double, and selective
    checkpointing refuses an in-place op the forward's policy did not see) nor replace the
    recorded aux stats (the loss was already built from the first forward's). Inside a
    compiled graph the state updates happen once, so there is nothing to skip.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def count_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 occurrences of each expert in ``experts`` (no host sync, unlike bincount)."""
    flat = experts.flatten()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class MoE(nn.Module):
    """Token-choice top-k mixture of SwiGLU experts: (B, S, dim) -> (B, S, dim).

    Each token goes to its ``top_k`` experts (``router``); the tokens are sorted by expert and
    run through ``experts`` as ``experts(routed_input, num_tokens_per_expert)`` (expert
    parallel wraps that call from outside); each output row is weighted by its routing weight,
    summed back per token, plus ``shared_experts(x)`` if any.

    Buffers: ``expert_bias`` (E,) fp32, in the state dict, shifts the selection only (zero
    unless ``load_balance_coeff`` is set; updated by :func:`update_expert_bias`);
    ``tokens_per_expert`` (E,) fp32, not saved, the tokens each expert received in training
    forwards since the last bias update.

    Attributes:
        block_attr: the name a :class:`~titan_core.models.TransformerBlock` registers it under.
        aux_stats: this layer's :class:`AuxStats` from its latest forward, for
            :func:`load_balancing_loss`.

    Args:
        dim: model width.
        args: the layer's MoE arguments.
    """

    block_attr: ClassVar[str] = "moe"

    def __init__(self, dim: int, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.router = TokenChoiceRouter(dim, args)
        self.experts = GroupedExperts(dim, args.hidden_dim, args.num_experts, args.use_grouped_mm)
        self.shared_experts = FeedForward(dim, args.shared_width) if args.shared_width else None
        zeros = torch.zeros(args.num_experts, dtype=torch.float32)
        self.register_buffer("expert_bias", zeros, persistent=True)
        self.register_buffer("tokens_per_expert", zeros.clone(), persistent=False)
        self.aux_stats: AuxStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs, seq, dim = x.shape
        x = x.reshape(-1, dim)  # (N, dim)
        bias = self.expert_bias.float() if self.args.load_balance_coeff is not None else None
        routing = self.router(x, bias)
        num_tokens_per_expert = count_per_expert(routing.experts, self.args.num_experts)
        # NOTE: computed in a replay too, which must save the same tensors for backward.
        aux_stats = self._aux_stats(routing)
        if not _replaying():
            self.aux_stats = aux_stats
            if self.training:
                with torch.no_grad():
                    self.tokens_per_expert.add_(num_tokens_per_expert.float())
        # (N*K,) token-slot order grouping the slots by expert, stable so ties keep token order
        order = torch.argsort(routing.experts.flatten(), stable=True)
        token_of_slot = order // self.args.top_k
        routed = self.experts(x[token_of_slot], num_tokens_per_expert)  # (N*K, dim)
        # NOTE: weighted after the experts, as transformers' Qwen3-MoE and DeepSeek V3 do.
        weights = routing.weights.flatten()[order].unsqueeze(-1)  # (N*K, 1)
        routed = (routed.float() * weights).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, routed)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(bs, seq, dim)

    def _aux_stats(self, routing: Routing) -> AuxStats:
        """What this forward contributes to :func:`load_balancing_loss`."""
        args = self.args
        plain_topk = args.score_func == "softmax" and args.load_balance_coeff is None
        if plain_topk and args.n_group == 1:
            probs, picked = routing.scores, routing.experts
        else:  # the loss is defined on the softmax's own top-k, whatever selected the experts
            probs = F.softmax(routing.logits, dim=-1)
            picked = probs.detach().topk(args.top_k, dim=-1).indices
        selections = count_per_expert(picked, args.num_experts).float()
        return AuxStats(selections, probs.sum(0), probs.shape[0])

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """Router and experts as :class:`TokenChoiceRouter` and :class:`GroupedExperts` say,
        shared experts as a dense FFN, both buffers zero."""
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

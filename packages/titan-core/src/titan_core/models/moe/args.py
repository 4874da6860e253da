"""The architecture of one mixture-of-experts layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True, frozen=True)
class MoEArgs:
    """One MoE layer: token-choice top-k routing over ``num_experts`` SwiGLU experts.

    Args:
        num_experts: routed experts per layer.
        top_k: experts each token is sent to.
        hidden_dim: inner width of one routed expert.
        num_shared_experts: experts every token goes through (DeepSeek); 0 for none.
        shared_hidden_dim: inner width of the shared experts' one SwiGLU; None:
            ``hidden_dim * num_shared_experts``.
        score_func: router scores: ``softmax`` over experts (Qwen3-MoE) or a ``sigmoid`` per
            expert (DeepSeek V3); always computed in fp32.
        norm_topk_prob: rescale each token's k selected scores to sum to one.
        route_scale: multiplies the routing weights (DeepSeek's ``routed_scaling_factor``).
        n_group: expert groups for group-limited routing; 1 disables it.
        topk_group: groups a token may pick its experts from (DeepSeek V3).
        load_balance_coeff: step of the auxiliary-loss-free expert-bias update after each
            optimizer step; None: no bias (it stays zero).
        aux_loss_coef: weight of the load-balancing loss added to the training loss
            (Qwen3-MoE's ``router_aux_loss_coef``); 0 for none.
        use_grouped_mm: run the experts as one ``torch._grouped_mm`` where the device and dtype
            allow it (fp32 on CPU, bf16 on CUDA), else as a loop over experts.
        force_load_balance: debugging: token ``i``'s ``k``-th slot goes to expert
            ``(i * top_k + k) % num_experts`` whatever the scores (torchtitan's
            ``debug.moe_force_load_balance``); the weights are still the chosen experts' scores.
    """

    num_experts: int
    top_k: int
    hidden_dim: int
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = False
    route_scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    load_balance_coeff: float | None = None
    aux_loss_coef: float = 0.0
    use_grouped_mm: bool = True
    force_load_balance: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden_dim", "n_group", "topk_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoEArgs.{name}={getattr(self, name)} must be at least 1")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEArgs.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEArgs.score_func='{self.score_func}': use softmax or sigmoid")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"MoEArgs.n_group={self.n_group} does not divide num_experts={self.num_experts}"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"MoEArgs.topk_group={self.topk_group} is more than n_group={self.n_group}"
            )
        reachable = self.topk_group * self.num_experts // self.n_group
        if self.top_k > reachable:
            raise ValueError(
                f"MoEArgs.top_k={self.top_k} is more than the {reachable} experts a token can "
                f"reach (num_experts={self.num_experts}, n_group={self.n_group}, "
                f"topk_group={self.topk_group})"
            )
        if self.load_balance_coeff is not None and self.load_balance_coeff <= 0:
            raise ValueError(
                f"MoEArgs.load_balance_coeff={self.load_balance_coeff} must be positive "
                "(None disables the expert bias)"
            )
        if self.aux_loss_coef < 0:
            raise ValueError(f"MoEArgs.aux_loss_coef={self.aux_loss_coef} must be >= 0")

    @property
    def shared_width(self) -> int:
        """Inner width of the shared experts' SwiGLU (0 when there are none)."""
        if self.num_shared_experts == 0:
            return 0
        if self.shared_hidden_dim is not None:
            return self.shared_hidden_dim
        return self.hidden_dim * self.num_shared_experts

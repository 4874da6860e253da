"""Load balancing across experts: the auxiliary loss, and the expert-bias update that runs
after each optimizer step.

NOTE: training-time code, not model code: :func:`update_expert_bias` sums the token counts
over the ranks that hold the same layers, so this module (unlike the layers) uses
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from titan_core.models.moe.layer import MoE


def moe_layers(model_parts: Iterable[nn.Module]) -> list[MoE]:
    """Every :class:`MoE` module of the model parts, in module order."""
    return [m for part in model_parts for m in part.modules() if isinstance(m, MoE)]


def load_balancing_loss(
    moe_modules: Iterable[MoE], group: dist.ProcessGroup | None = None, grad_average: int = 1
) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss over the latest forward of ``moe_modules``,
    as transformers' ``load_balancing_loss_func`` computes it for Qwen3-MoE (its
    ``router_aux_loss_coef`` multiplies it): the layers' tokens are pooled, not averaged,

        num_experts * sum_e (C_e / (L*T)) * (P_e / (L*T))

    where, over the L layers' T tokens each, C_e counts the top-k picks of expert e and P_e sums
    its softmax probability. Its gradient reaches the routers through P_e. Balanced routing
    gives ``top_k``; layers that have not run are left out; none at all gives 0.

    With ``group``, the tokens of every rank in it are pooled too, as one process pools its
    whole batch: C and T (no gradient) are summed over the group, and this rank returns its own
    share of the sum over P, ``grad_average x num_experts x sum_e (C_e / LT) (P_e_local / LT)``.
    The shares add up to the pooled loss; ``grad_average`` undoes the averaging of gradients
    over data-parallel ranks (the ranks' terms are summed, not averaged).

    Args:
        moe_modules: the MoE layers (e.g. :func:`moe_layers` of a model part); equal expert
            counts.
        group: the ranks whose tokens are pooled (every rank of a pipeline stage), or None.
        grad_average: how many ranks the gradients are averaged over (1 for the value).
    """
    stats = [m.aux_stats for m in moe_modules if m.aux_stats is not None]
    if not stats:
        return torch.zeros(())
    sizes = {s.selections.numel() for s in stats}
    if len(sizes) > 1:
        raise ValueError(f"load_balancing_loss: layers have different expert counts {sizes}")
    selections = torch.stack([s.selections for s in stats]).sum(0)
    tokens = torch.tensor([float(sum(s.n_tokens for s in stats))], device=selections.device)
    if group is not None:
        pooled = torch.cat([selections, tokens])  # (E + 1,) one all-reduce, no gradient
        dist.all_reduce(pooled, group=group)
        selections, tokens = pooled[:-1], pooled[-1:]
    probs = torch.stack([s.prob_sum for s in stats]).sum(0)
    return grad_average * sizes.pop() * torch.sum(selections * probs) / tokens[0] ** 2


@torch.no_grad()
def update_expert_bias(
    model_parts: Iterable[nn.Module], group: dist.ProcessGroup | None = None
) -> dict[str, float]:
    """After an optimizer step: nudge each expert bias towards balance and reset the counts.

    The tokens each expert received since the last call (every microbatch of the step) are
    summed over ``group``; each layer's bias then moves by ``load_balance_coeff`` up for the
    experts below the mean count and down for those above (``coeff * sign(mean - count)``,
    centred to sum to zero). Layers without ``load_balance_coeff`` keep a zero bias.

    Args:
        model_parts: this rank's model parts (one, or its pipeline stages).
        group: every rank holding the same layers (all ranks of this pipeline stage); None in
            one process.

    Returns:
        ``{"moe_load_max_over_mean": r}``: over the layers that routed tokens, the largest
        ratio of an expert's tokens to the mean (1.0 is perfect balance); empty without MoE
        layers.
    """
    layers = moe_layers(model_parts)
    if not layers:
        return {}
    counts = torch.cat([m.tokens_per_expert for m in layers])
    if group is not None:
        dist.all_reduce(counts, group=group)
    sizes = [m.tokens_per_expert.numel() for m in layers]
    ratios = []
    for m, c in zip(layers, counts.split(sizes), strict=True):
        mean = c.mean()
        ratios.append(torch.where(mean > 0, c.max() / mean.clamp_min(1.0), 0.0))
        coeff = m.args.load_balance_coeff
        if coeff is not None:
            delta = coeff * torch.sign(mean - c)
            m.expert_bias.add_(delta - delta.mean())
        m.tokens_per_expert.zero_()
    return {"moe_load_max_over_mean": torch.stack(ratios).max().item()}

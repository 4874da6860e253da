"""The TrainSpec hooks an MoE family sets: its load-balancing loss and its expert-bias update.

A family whose model uses :class:`titan_core.models.moe.MoE` layers registers::

    TrainSpec(..., aux_loss_fn=moe_aux_loss, post_optimizer_fn=moe_after_optimizer_step)

Both are no-ops for a model part without MoE layers, so a family with dense and MoE flavors sets
them once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from titan_core.models.moe import load_balancing_loss, moe_layers, update_expert_bias


def moe_aux_loss(model_part: nn.Module) -> torch.Tensor | None:
    """``aux_loss_coef x`` the load-balancing loss of the part's MoE layers' latest forward.

    The layers of one part are pooled as transformers pools all of a model's layers, so in one
    process (and under every layout but pipeline parallel) the term is transformers' exactly;
    under pipeline parallel each stage adds its own layers' term.
    """
    layers = moe_layers([model_part])
    coef = layers[0].args.aux_loss_coef if layers else 0.0
    if not coef:
        return None
    return coef * load_balancing_loss(layers)


def moe_after_optimizer_step(model_parts: list[nn.Module], mesh: Any) -> dict[str, float]:
    """Update the expert biases from the step's token counts; return the MoE metrics.

    Counts are summed over every rank of this pipeline stage (``dp_cp_tp``), since each routes
    different tokens. Logged: ``moe_load_max_over_mean`` (the most loaded expert over the mean,
    worst layer; 1.0 is perfect balance) and ``aux_loss`` (the load-balancing loss of the
    step's last microbatch, before ``aux_loss_coef``; balanced routing gives ``top_k``).
    """
    layers = moe_layers(model_parts)
    if not layers:
        return {}
    with torch.no_grad():
        aux = load_balancing_loss(layers).item()
    group = mesh.get("dp_cp_tp").get_group() if mesh is not None else None
    return {**update_expert_bias(model_parts, group), "aux_loss": aux}

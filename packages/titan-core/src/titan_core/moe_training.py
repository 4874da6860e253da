"""The TrainSpec hooks an MoE family sets: its load-balancing loss and its expert-bias update.

A family whose model uses :class:`titan_core.models.moe.MoE` layers registers::

    TrainSpec(..., aux_loss_fn=moe_aux_loss, post_optimizer_fn=moe_after_optimizer_step)

Both are no-ops for a model part without MoE layers, so a family with dense and MoE flavors sets
them once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from titan_core.models.moe import load_balancing_loss, moe_layers, update_expert_bias


def moe_aux_loss(model_part: nn.Module, mesh: Any) -> torch.Tensor | None:
    """``aux_loss_coef x`` the load-balancing loss of the part's MoE layers' latest forward.

    The layers of one part and the tokens of every rank of its pipeline stage (``dp_cp_tp``)
    are pooled, as transformers pools a whole batch in all of a model's layers: in one process,
    and under every layout but pipeline parallel, the term and its gradients are the same as
    one process's. Under pipeline parallel each stage adds its own layers' term.
    """
    layers = moe_layers([model_part])
    coef = layers[0].args.aux_loss_coef if layers else 0.0
    if not coef:
        return None
    if mesh is None:
        return coef * load_balancing_loss(layers)
    averaged = mesh.get("dp_cp").size()  # FSDP averages gradients over these ranks
    return coef * load_balancing_loss(layers, mesh.get("dp_cp_tp").get_group(), averaged)


def moe_after_optimizer_step(model_parts: list[nn.Module], mesh: Any) -> dict[str, float]:
    """Update the expert biases from the step's token counts; return the MoE metrics.

    Counts are summed over every rank of this pipeline stage (``dp_cp_tp``), since each routes
    different tokens. Logged: ``moe_load_max_over_mean`` (the most loaded expert over the mean,
    worst layer of any stage; 1.0 is perfect balance) and ``aux_loss`` (the load-balancing loss
    of the step's last microbatch, pooled over the stage's ranks, before ``aux_loss_coef``;
    under pipeline parallel the mean of the stages' own values; balanced routing gives
    ``top_k``).
    """
    layers = moe_layers(model_parts)
    if not layers and getattr(getattr(model_parts[0], "args", None), "moe", None) is None:
        return {}  # a dense model (every pipeline stage knows it from the args)
    if mesh is None:
        with torch.no_grad():
            aux = load_balancing_loss(layers).item()
        return {**update_expert_bias(model_parts), "aux_loss": aux}
    stage = mesh.get("dp_cp_tp").get_group()
    with torch.no_grad():
        aux = load_balancing_loss(layers, stage) if layers else torch.zeros(())
        # (aux share, stages with MoE layers): the ranks' shares add up to the pooled value
        aux = torch.stack([aux.reshape(()).cpu(), torch.tensor(float(bool(layers)))])
        aux = aux.to(mesh.device_type)
        dist.all_reduce(aux, group=stage)
        aux[1] = float(bool(layers))
    load = update_expert_bias(model_parts, stage).get("moe_load_max_over_mean", 0.0)
    load = torch.tensor([load], device=mesh.device_type)
    if mesh.get("pp").size() > 1:
        pp = mesh.get("pp").get_group()  # stages without MoE layers join with zeros
        dist.all_reduce(aux, group=pp)
        dist.all_reduce(load, op=dist.ReduceOp.MAX, group=pp)
    return {"moe_load_max_over_mean": load.item(), "aux_loss": (aux[0] / aux[1]).item()}

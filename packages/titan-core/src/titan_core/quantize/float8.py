"""``quantize.linear.float8``: torchao Float8 training for the model's ``nn.Linear`` layers.

Recipes: ``tensorwise`` (one scale per tensor; the weights may be all-gathered by FSDP in
float8, with their scales precomputed in one all-reduce after each optimizer step) and the
rowwise ones. The weights stay in high precision (the float8 casts happen inside each matmul),
so checkpoints have the same keys and dtypes with or without this converter.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from titan_core.config.job_config import JobConfig
from titan_core.errors import UserError
from titan_core.quantize.converters import ModelConverter
from titan_core.quantize.linear_filter import LinearFilter
from titan_core.quantize.torchao_support import import_torchao, quiet_torchao, require_capability

NAME = "quantize.linear.float8"
logger = logging.getLogger("titan")


class Float8LinearConverter(ModelConverter):
    """Swap ``nn.Linear`` layers for torchao's ``Float8Linear``.

    Args:
        config: the job config; ``[quantize.linear.float8]`` is read.
        device: where the model will train (CUDA needs compute capability >= 8.9).
    """

    name = NAME

    def __init__(self, config: JobConfig, device: torch.device) -> None:
        self.cfg = cfg = config.quantize.linear.float8
        if cfg.recipe_name != "tensorwise" and cfg.enable_fsdp_float8_all_gather:
            raise UserError(
                f"quantize.linear.float8.enable_fsdp_float8_all_gather: only the tensorwise "
                f"recipe gathers weights in float8, not {cfg.recipe_name}; turn it off or use "
                "recipe_name tensorwise"
            )
        if cfg.precompute_float8_dynamic_scale_for_fsdp and not cfg.enable_fsdp_float8_all_gather:
            raise UserError(
                "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp: needs "
                "enable_fsdp_float8_all_gather (the scales are those of the gathered weights)"
            )
        if not cfg.emulate:
            require_capability(
                device, (8, 9), NAME, "use an H100/L40/Ada or newer, or set emulate = true"
            )
        if not cfg.emulate and device.type == "cpu":
            # NOTE: measured on a 2-core Intel Xeon VM (torch 2.13): oneDNN ran its reference
            # float8 matmul, and llama3 debugmodel's first step had not ended after 2 minutes.
            logger.warning(
                "%s on CPU without emulate: torch._scaled_mm may run oneDNN's reference float8 "
                "kernel, far slower than fp32; set quantize.linear.float8.emulate = true",
                NAME,
            )
        self.torchao = import_torchao("torchao.float8", NAME)

    def torchao_config(self) -> Any:
        """torchao's ``Float8LinearConfig`` for the recipe and switches."""
        cfg = self.cfg
        ao = self.torchao.Float8LinearConfig.from_recipe_name(cfg.recipe_name)
        return dataclasses.replace(
            ao, enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather, emulate=cfg.emulate
        )

    def convert(self, model: nn.Module) -> str:
        keep = LinearFilter(self.cfg.filter_fqns, self.cfg.recipe_name)
        with quiet_torchao():
            self.torchao.convert_to_float8_training(
                model, config=self.torchao_config(), module_filter_fn=keep
            )
        mode = ", emulated" if self.cfg.emulate else ""
        return keep.selection.summary(f"float8 {self.cfg.recipe_name}{mode}")

    def after_optimizer_step(self, model_parts: list[nn.Module]) -> None:
        """One all-reduce computes every float8-gathered weight's scale for the next step."""
        if self.cfg.precompute_float8_dynamic_scale_for_fsdp:
            for part in model_parts:
                self.torchao.precompute_float8_dynamic_scale_for_fsdp(part)

    def adapt_tp_plan(self, plan: dict[str, Any], model: nn.Module, device_type: str) -> dict:
        """On CUDA with tensorwise scaling, torchao's float8 TP styles for the float8 layers.

        NOTE: those styles send float8 tensors through the TP collectives, which gloo cannot
        carry ("Invalid scalar type"); on CPU, and for the rowwise recipes, the ordinary styles
        stay (each Float8Linear casts its own local shard).
        """
        if device_type != "cuda" or self.cfg.recipe_name != "tensorwise":
            return plan
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        tp = import_torchao("torchao.float8.float8_tensor_parallel", NAME)
        swaps = {
            ColwiseParallel: tp.Float8ColwiseParallel,
            RowwiseParallel: tp.Float8RowwiseParallel,
        }
        adapted = dict(plan)
        for fqn, style in plan.items():
            float8_style = swaps.get(type(style))
            if float8_style is not None and _is_float8(model, fqn):
                adapted[fqn] = float8_style(
                    input_layouts=style.input_layouts[0],
                    output_layouts=style.output_layouts[0],
                    use_local_output=style.use_local_output,
                )
        return adapted


def _is_float8(model: nn.Module, fqn: str) -> bool:
    """Whether ``fqn`` (top-level, or inside the first block) names a Float8Linear."""
    from torchao.float8.float8_linear import Float8Linear

    roots = [model, *list(getattr(model, "layers", {}).values())[:1]]
    for root in roots:
        try:
            if isinstance(root.get_submodule(fqn), Float8Linear):
                return True
        except AttributeError:
            continue
    return False

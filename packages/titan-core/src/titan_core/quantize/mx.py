"""``quantize.linear.mx``: torchao MXFP8 training for the model's ``nn.Linear`` layers.

torchao swaps each chosen layer's weight for a wrapper tensor whose matmuls quantize both
operands to MXFP8 (blocks of 32 values sharing one power-of-two scale). The weight underneath
stays in high precision, so checkpoints keep their keys and dtypes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from titan_core.config.job_config import JobConfig
from titan_core.quantize.converters import ModelConverter
from titan_core.quantize.linear_filter import LinearFilter
from titan_core.quantize.torchao_support import import_torchao, quiet_torchao, require_capability

NAME = "quantize.linear.mx"
# torchtitan's recipe names -> torchao's (torchao computes MX scales with RCEIL rounding).
_RECIPE_ALIASES = {"mxfp8": "mxfp8_rceil", "mxfp8_cublas_rceil": "mxfp8_rceil"}
MX_MIN_CAPABILITY = (10, 0)


def mx_training_config(recipe_name: str, converter: str, device: torch.device) -> Any:
    """torchao's ``MXFP8TrainingOpConfig`` for a recipe; hardware checked for the real kernels.

    Args:
        recipe_name: mxfp8_rceil, mxfp8_rceil_wgrad_with_hp or mxfp8_emulated_rceil (or a
            torchtitan alias of mxfp8_rceil).
        converter: the converter's name, for errors.
        device: where training runs; the non-emulated recipes need CUDA >= 10.0.
    """
    recipe = _RECIPE_ALIASES.get(recipe_name, recipe_name)
    if recipe != "mxfp8_emulated_rceil":
        if device.type != "cuda":
            from titan_core.errors import UserError

            raise UserError(
                f"model.converters: {converter} recipe {recipe_name} runs CUDA kernels "
                "(compute capability >= 10.0); on CPU use recipe_name mxfp8_emulated_rceil"
            )
        require_capability(
            device, MX_MIN_CAPABILITY, converter, "use a B200 or newer, or mxfp8_emulated_rceil"
        )
    config = import_torchao("torchao.prototype.moe_training.config", converter)
    return config.MXFP8TrainingOpConfig.from_recipe(config.MXFP8TrainingRecipe(recipe))


def quantize_modules(model: nn.Module, op_config: Any, keep: Any, converter: str) -> None:
    """torchao's ``quantize_`` over the modules ``keep(module, fqn)`` accepts."""
    quantization = import_torchao("torchao.quantization", converter)
    with quiet_torchao():
        quantization.quantize_(model, op_config, filter_fn=keep)


class MXLinearConverter(ModelConverter):
    """MXFP8 matmuls for the ``nn.Linear`` layers that ``filter_fqns`` does not exclude."""

    name = NAME

    def __init__(self, config: JobConfig, device: torch.device) -> None:
        self.cfg = config.quantize.linear.mx
        self.op_config = mx_training_config(self.cfg.recipe_name, NAME, device)

    def convert(self, model: nn.Module) -> str:
        keep = LinearFilter(self.cfg.filter_fqns)
        quantize_modules(model, self.op_config, keep, NAME)
        return keep.selection.summary(f"mx {self.cfg.recipe_name}")

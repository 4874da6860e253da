"""``quantize.grouped_mm.float8`` / ``.mx``: low-precision grouped matmuls for routed experts.

torchao swaps the stacked 3-D expert weights of the chosen MoE modules for wrapper tensors whose
``torch._grouped_mm`` quantizes both operands (float8 rowwise, or MXFP8). The weights underneath
stay in high precision, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from titan_core.config.job_config import JobConfig
from titan_core.errors import UserError
from titan_core.quantize.converters import ModelConverter
from titan_core.quantize.mx import mx_training_config, quantize_modules
from titan_core.quantize.torchao_support import import_torchao, require_capability

FLOAT8_GROUPED_MIN_CAPABILITY = (9, 0)


class ExpertsFilter:
    """Accept the modules holding stacked expert weights whose name contains an ``fqns`` entry.

    Args:
        fqns: name fragments, e.g. ``experts``.
    """

    def __init__(self, fqns: list[str]) -> None:
        self.fqns = fqns
        self.converted: list[str] = []

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if stacked and any(fragment in fqn for fragment in self.fqns):
            self.converted.append(fqn)
            return True
        return False

    def summary(self, what: str) -> str:
        if not self.converted:
            raise UserError(
                f"{what}.fqns={self.fqns}: no module of this model with stacked expert weights "
                "matches; name the MoE experts (e.g. experts) or drop the converter"
            )
        return f"{what}: converted the routed experts of {len(self.converted)} MoE layers"


def _check_fqns(name: str, fqns: list[str]) -> None:
    if not fqns:
        raise UserError(
            f"{name}.fqns is empty: name the MoE modules to convert (e.g. --{name}.fqns experts)"
        )


class Float8GroupedMMConverter(ModelConverter):
    """Float8 rowwise grouped matmuls for the routed experts (CUDA >= 9.0 with triton)."""

    name = "quantize.grouped_mm.float8"

    def __init__(self, config: JobConfig, device: torch.device) -> None:
        self.fqns = config.quantize.grouped_mm.float8.fqns
        _check_fqns(self.name, self.fqns)
        if device.type != "cuda":
            raise UserError(
                f"model.converters: {self.name} runs torchao's triton kernels, CUDA only "
                "(compute capability >= 9.0); on CPU use quantize.grouped_mm.mx with "
                "recipe_name mxfp8_emulated_rceil"
            )
        require_capability(device, FLOAT8_GROUPED_MIN_CAPABILITY, self.name, "use an H100 or newer")
        config_mod = import_torchao("torchao.prototype.moe_training.config", self.name)
        self.op_config = config_mod.Float8TrainingOpConfig.from_recipe(
            config_mod.Float8TrainingRecipe.FP8_ROWWISE
        )

    def convert(self, model: nn.Module) -> str:
        keep = ExpertsFilter(self.fqns)
        quantize_modules(model, self.op_config, keep, self.name)
        return keep.summary(self.name)


class MXGroupedMMConverter(ModelConverter):
    """MXFP8 grouped matmuls for the routed experts."""

    name = "quantize.grouped_mm.mx"

    def __init__(self, config: JobConfig, device: torch.device) -> None:
        cfg = config.quantize.grouped_mm.mx
        self.fqns = cfg.fqns
        _check_fqns(self.name, self.fqns)
        self.op_config = mx_training_config(cfg.recipe_name, self.name, device)

    def convert(self, model: nn.Module) -> str:
        keep = ExpertsFilter(self.fqns)
        quantize_modules(model, self.op_config, keep, self.name)
        return keep.summary(self.name)

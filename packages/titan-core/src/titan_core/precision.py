"""Training dtypes from ``[training]`` mixed-precision keys."""

from __future__ import annotations

import torch
from torch import nn

from titan_core.config.job_config import Training

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def param_and_reduce_dtypes(cfg: Training, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(compute/param dtype, gradient-reduce dtype).

    ``auto`` means bfloat16 on GPU and float32 on CPU, where bf16 matmuls lack hardware support
    and run ~16x slower than fp32 (see docs/performance.md).
    """
    param = cfg.mixed_precision_param
    if param == "auto":
        param = "float32" if device_type == "cpu" else "bfloat16"
    return _DTYPES[param], _DTYPES[cfg.mixed_precision_reduce]


def fsdp_casts_parameters(model_parts: list[nn.Module]) -> bool:
    """Whether FSDP wraps the model, so its mixed-precision policy casts the parameters.

    The parallelize hook applies FSDP (with :func:`param_and_reduce_dtypes`' policy) only when
    data parallelism or context parallelism shards it; other layouts (TP, PP alone) need autocast.
    """
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for part in model_parts for m in part.modules())


def describe_precision(param: torch.dtype, reduce: torch.dtype, by_fsdp: bool) -> str:
    """One line for the log: the compute dtype and what applies it."""
    name = str(param).removeprefix("torch.")
    if param == torch.float32:
        return "float32 (no mixed precision)"
    if by_fsdp:
        r = str(reduce).removeprefix("torch.")
        return f"{name} through FSDP's parameter cast (float32 weights, {r} gradient reduction)"
    return f"{name} through autocast (float32 weights and gradients)"

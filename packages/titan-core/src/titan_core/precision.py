"""Training dtypes from ``[training]`` mixed-precision keys."""

from __future__ import annotations

import torch

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

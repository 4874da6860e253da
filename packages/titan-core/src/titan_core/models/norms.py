"""Normalisation layers shared by every model family."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale and no bias.

    The statistic is computed in float32 whatever the input dtype, then cast back, as the
    reference implementations of Llama and Qwen do; bf16 sums lose too much precision.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

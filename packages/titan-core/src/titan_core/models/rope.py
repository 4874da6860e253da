"""Rotary position embeddings (RoPE) and their frequency variants.

Layout: we rotate *interleaved* pairs ``(x[2i], x[2i+1])`` of each head, as Meta's original Llama
code does. Hugging Face checkpoints use the rotate-half layout instead; the HF adapters permute
the rows of ``wq``/``wk`` so that both give the same attention scores.

A variant is a small subclass overriding :meth:`RoPE.inv_freq`; the tables are real cos/sin
tensors (no complex numbers), which compile cleanly and shard like any other tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class RoPE(nn.Module):
    """Plain RoPE: frequency ``theta ** (-2i / head_dim)`` for pair ``i``.

    Args:
        head_dim: size of one attention head (even).
        max_seq_len: number of positions to precompute.
        theta: the base of the geometric frequency ladder.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        # NOTE: not persistent: the tables are a function of the args, never checkpointed, and
        # are rebuilt by reset_parameters() after a model built on the meta device is materialised.
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset_parameters()

    def inv_freq(self) -> torch.Tensor:
        """Angular frequency of each of the ``head_dim // 2`` pairs, float64."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def table_scale(self) -> float:
        """A factor on both tables (1 here; YaRN's attention factor scales q.k through them)."""
        return 1.0

    def reset_parameters(self) -> None:
        if self.cos.is_meta:
            return
        positions = torch.arange(self.max_seq_len, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq())  # (S, D/2)
        scale = self.table_scale()
        with torch.no_grad():
            self.cos.copy_((angles.cos() * scale).to(self.cos.dtype))
            self.sin.copy_((angles.sin() * scale).to(self.sin.dtype))

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) tables for the first ``seq_len`` positions, each (S, D/2)."""
        return self.cos[:seq_len], self.sin[:seq_len]


@dataclass(kw_only=True, frozen=True)
class Llama3RopeScaling:
    """Llama 3.1 long-context frequency scaling (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


class Llama3RoPE(RoPE):
    """RoPE whose low frequencies are slowed by ``factor``, blending smoothly in between.

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency; those longer
    than ``original / low_freq_factor`` are divided by ``factor``; the band between interpolates.
    """

    def __init__(
        self, head_dim: int, max_seq_len: int, theta: float, scaling: Llama3RopeScaling
    ) -> None:
        self.scaling = scaling
        super().__init__(head_dim, max_seq_len, theta)

    def inv_freq(self) -> torch.Tensor:
        freq = super().inv_freq()
        s = self.scaling
        wavelen = 2 * math.pi / freq
        orig = s.original_max_position_embeddings
        smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * freq / s.factor + smooth * freq
        out = torch.where(wavelen > orig / s.low_freq_factor, freq / s.factor, blended)
        return torch.where(wavelen < orig / s.high_freq_factor, freq, out)


@dataclass(kw_only=True, frozen=True)
class YarnScaling:
    """YaRN context extension (HF ``rope_type: yarn``), as DeepSeek V3 uses it.

    Args:
        factor: how many times longer than ``original_max_position_embeddings`` the context is.
        original_max_position_embeddings: the context the model was pretrained on.
        beta_fast: rotations per original context above which a frequency is kept as is.
        beta_slow: rotations below which a frequency is divided by ``factor``.
        mscale: numerator weight of the tables' attention factor.
        mscale_all_dim: denominator weight of the tables' attention factor, and the weight of
            the softmax-scale correction; 0 for none.
        truncate: round the boundary dimensions of the blend outwards (HF's default).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def _mscale(self, weight: float) -> float:
        return 1.0 if self.factor <= 1 else 0.1 * weight * math.log(self.factor) + 1.0

    def attention_factor(self) -> float:
        """The factor on the cos/sin tables (so on q.k twice over the rotated dimensions)."""
        if self.mscale and self.mscale_all_dim:
            return self._mscale(self.mscale) / self._mscale(self.mscale_all_dim)
        return self._mscale(1.0)

    def softmax_scale_factor(self) -> float:
        """The factor on the attention's softmax scale (``mscale_all_dim`` squared)."""
        return self._mscale(self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


class YarnRoPE(RoPE):
    """RoPE whose frequencies blend from kept (high) to divided by ``factor`` (low), over the
    dimensions that turn between ``beta_slow`` and ``beta_fast`` times in the original context;
    both tables are scaled by :meth:`YarnScaling.attention_factor`."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: YarnScaling) -> None:
        self.scaling = scaling
        super().__init__(head_dim, max_seq_len, theta)

    def _boundary(self, rotations: float) -> float:
        """The dimension whose wavelength fits ``rotations`` times in the original context."""
        orig = self.scaling.original_max_position_embeddings
        return (self.head_dim * math.log(orig / (rotations * 2 * math.pi))) / (
            2 * math.log(self.theta)
        )

    def inv_freq(self) -> torch.Tensor:
        s = self.scaling
        freq = super().inv_freq()
        low, high = self._boundary(s.beta_fast), self._boundary(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.head_dim - 1)
        high = high + 0.001 if low == high else high  # a zero-width ramp is a step
        ramp = ((torch.arange(self.head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(
            0, 1
        )
        return freq / s.factor * ramp + freq * (1 - ramp)  # ramp 0: kept, 1: interpolated

    def table_scale(self) -> float:
        return self.scaling.attention_factor()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` (B, S, H, D) by the angles of its positions.

    ``cos``/``sin`` are (S', D/2) tables with S' >= S, position ``s`` of ``x`` using row ``s``;
    or (B, S', D/2), one table per row (decoding, where each row has its own positions).
    """
    seq_len = x.shape[1]
    if cos.dim() == 3:
        cos, sin = cos[:, :seq_len, None, :], sin[:, :seq_len, None, :]  # (B, S, 1, D/2)
    else:
        cos, sin = cos[None, :seq_len, None, :], sin[None, :seq_len, None, :]  # (1, S, 1, D/2)
    x_pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, H, D/2, 2)
    x1, x2 = x_pairs[..., 0], x_pairs[..., 1]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)

"""Key/value caching for decoding, applied to a model from outside (as context parallel is).

:func:`kv_cache` swaps every ``ScaledDotProductAttention`` kernel of a model for a
:class:`CachedAttention` that appends each call's keys and values to per-layer buffers and
attends over everything cached so far, and swaps ``model.rope`` for a :class:`CachedRoPE` that
returns the tables of each row's own positions. Any family whose attention goes through that
kernel and whose RoPE is ``model.rope`` (Llama, Qwen3 dense and MoE, DeepSeek's latent attention)
decodes with a cache without a line of model code knowing.

Rows are left-padded to a common length: a padded slot is never attended to, and each row's
positions count only its real tokens, so a row decodes as it would alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from titan_core.models.attention import ScaledDotProductAttention


class DecodeState:
    """What every cached kernel of one model shares during one generation.

    Args:
        valid: (B, S0) bool, True at the real tokens of the left-padded prompts.
        capacity: the most slots a row will hold (prompt plus new tokens).
    """

    def __init__(self, valid: torch.Tensor, capacity: int) -> None:
        batch = valid.shape[0]
        self.capacity = capacity
        self.slots_used = 0  # slots written by earlier forwards
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=valid.device)
        self._next_position = torch.zeros(batch, dtype=torch.long, device=valid.device)
        self.positions = torch.zeros_like(valid, dtype=torch.long)  # (B, S) of this forward
        self.mask = torch.zeros(batch, 1, 0, 0, dtype=torch.bool, device=valid.device)
        self.start = 0  # first slot of this forward

    def begin(self, valid: torch.Tensor) -> None:
        """Prepare the next forward of (B, S) tokens whose real ones are ``valid``."""
        seq = valid.shape[1]
        end = self.slots_used + seq
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} slots; this forward needs {end}")
        counts = valid.long().cumsum(dim=1)  # real tokens up to and including each slot
        self.positions = (self._next_position[:, None] + counts - 1).clamp(min=0)
        self._next_position = self._next_position + counts[:, -1]
        self.key_valid[:, self.slots_used : end] = valid
        self.start, self.slots_used = self.slots_used, end
        # (B, 1, S, T): a query sees the valid keys up to its own slot, and itself (so that a
        # padded query's softmax has a term; its output is never used).
        slots = torch.arange(end, device=valid.device)
        query_slots = torch.arange(self.start, end, device=valid.device)
        causal = slots[None, :] <= query_slots[:, None]  # (S, T)
        own = slots[None, :] == query_slots[:, None]
        visible = (causal[None] & self.key_valid[:, None, :end]) | own[None]
        self.mask = visible[:, None]


class CachedRoPE(nn.Module):
    """Wraps a RoPE module: its tables at the positions of the current forward, (B, S, D/2)."""

    def __init__(self, rope: nn.Module, state: DecodeState) -> None:
        super().__init__()
        self.inner = rope
        self.state = state

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.state.positions
        cos, sin = self.inner(int(positions.max()) + 1)
        return cos[positions], sin[positions]


class CachedAttention(nn.Module):
    """A drop-in for ``ScaledDotProductAttention`` that keeps the keys and values it has seen.

    Args:
        state: the generation's shared :class:`DecodeState`.
        scale: the kernel's softmax scale (None: ``1 / sqrt(D)``).
    """

    def __init__(self, state: DecodeState, scale: float | None) -> None:
        super().__init__()
        self.state = state
        self.scale = scale
        self.keys: torch.Tensor | None = None  # (B, H_kv, capacity, D)
        self.values: torch.Tensor | None = None  # (B, H_kv, capacity, Dv)

    def _buffers_for(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None or self.values is None:
            batch, heads, _, _ = k.shape
            cap = self.state.capacity
            self.keys = k.new_zeros(batch, heads, cap, k.shape[-1])
            self.values = v.new_zeros(batch, heads, cap, v.shape[-1])
        return self.keys, self.values

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self._buffers_for(k, v)
        start, end = self.state.start, self.state.slots_used
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q,
            keys[:, :, :end],
            values[:, :, :end],
            attn_mask=self.state.mask,
            enable_gqa=gqa,
            scale=self.scale,
        )


@contextlib.contextmanager
def kv_cache(model: nn.Module, valid: torch.Tensor, capacity: int) -> Iterator[DecodeState]:
    """Decode ``model`` with a key/value cache inside the block; the model is restored after.

    Call ``state.begin(valid)`` before each forward (the prompt's, then each new token's).

    Args:
        model: a model with a ``rope`` module and ``ScaledDotProductAttention`` kernels.
        valid: (B, S0) bool, True at the real tokens of the left-padded prompts.
        capacity: slots per row: the prompt's length plus the most new tokens.
    """
    kernels = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, ScaledDotProductAttention)
    }
    if not kernels or not isinstance(getattr(model, "rope", None), nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no `rope` module or no ScaledDotProductAttention "
            "kernel; the key/value cache swaps those"
        )
    state = DecodeState(valid, capacity)
    rope = model.rope
    try:
        for name, kernel in kernels.items():
            model.set_submodule(name, CachedAttention(state, kernel.scale))
        model.rope = CachedRoPE(rope, state)
        yield state
    finally:
        for name, kernel in kernels.items():
            model.set_submodule(name, kernel)
        model.rope = rope

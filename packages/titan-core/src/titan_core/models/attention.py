"""Grouped-query attention over ``scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan_core.models.norms import RMSNorm
from titan_core.models.rope import apply_rope


class ScaledDotProductAttention(nn.Module):
    """The attention kernel: causal SDPA over (B, H, S, D) queries and keys and (B, H_kv, S, Dv)
    values (``Dv`` may differ from ``D``). A separate module so that a parallelism (context
    parallel) can swap it from outside.

    Args:
        scale: the softmax scale; None: ``1 / sqrt(D)``.
    """

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # NOTE: enable_gqa lets the kernel share each kv head across its query heads instead of
        # materialising repeated copies (same result, ~15% faster attention on CPU).
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale
        )


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; ``n_kv_heads`` divides ``n_heads``.

    Projections ``wq``, ``wk``, ``wv``, ``wo`` carry no bias. Head counts are read from the weight
    shapes at run time, so a tensor-parallel plan that shards the projections column-wise works
    without telling this module.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads.
        head_dim: size of one head (need not equal dim // n_heads).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.head_dim = head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.sdpa = ScaledDotProductAttention()

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (B, S, heads, head_dim); subclasses add norms here."""
        q = self.wq(x).unflatten(-1, (-1, self.head_dim))
        k = self.wk(x).unflatten(-1, (-1, self.head_dim))
        v = self.wv(x).unflatten(-1, (-1, self.head_dim))
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
        out = self.sdpa(q, k, v)
        return self.wo(out.transpose(1, 2).flatten(2))  # (B, S, H*D)

    def init_weights(self, init_std: float) -> None:
        """q/k/v at std 0.02, the output projection at the depth-scaled ``init_std``."""
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)


class QKNormAttention(Attention):
    """Attention whose queries and keys are RMS-normalised per head, before RoPE (Qwen3).

    ``q_norm`` and ``k_norm`` each hold one ``head_dim`` scale shared by every head, so the
    attention logits stay bounded however large the projections grow.

    Args:
        dim: model width.
        n_heads: query heads.
        n_kv_heads: key/value heads.
        head_dim: size of one head; the norms' width.
        eps: the norms' epsilon.
    """

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, eps: float = 1e-6
    ) -> None:
        super().__init__(dim, n_heads, n_kv_heads, head_dim)
        self.q_norm = RMSNorm(head_dim, eps=eps)
        self.k_norm = RMSNorm(head_dim, eps=eps)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super().project_qkv(x)  # each (B, S, heads, head_dim): normed over head_dim
        return self.q_norm(q), self.k_norm(k), v

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()

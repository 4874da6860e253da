"""Multi-head latent attention (MLA, DeepSeek V2/V3): keys and values rebuilt from a small
shared latent, plus one RoPE key shared by every head."""

from __future__ import annotations

import torch
from torch import nn

from titan_core.models.attention import ScaledDotProductAttention
from titan_core.models.norms import RMSNorm
from titan_core.models.rope import apply_rope


class SharedKeyBroadcast(nn.Module):
    """The rope key every head shares, (B, S, 1, D) -> (B, S, heads, D) for ``heads`` query
    heads. A module of its own because under tensor parallel each rank holds some of the heads:
    the key's gradient is then a partial sum over this rank's heads, and the TP plan marks this
    module's output so that the partial sums are added over the TP group."""

    def forward(self, k_pe: torch.Tensor, heads: int) -> torch.Tensor:
        return k_pe.expand(-1, -1, heads, -1)


class MultiHeadLatentAttention(nn.Module):
    """Causal MLA with the paper's projection names.

    Queries: ``wq`` (dim -> heads x (nope + rope)), or with a query rank ``wq_a`` -> ``q_norm``
    -> ``wq_b``. Keys and values: ``wkv_a`` maps dim to a ``kv_lora_rank`` latent plus one
    ``qk_rope_head_dim`` key shared by all heads; the latent goes through ``kv_norm`` and
    ``wkv_b`` to each head's ``qk_nope_head_dim`` key part and ``v_head_dim`` value. RoPE turns
    only the rope parts, interleaved pairs (the layout of DeepSeek's checkpoints), so attention
    scores are ``q_nope.k_nope + rope(q_pe).rope(k_pe)``. Head counts are read from the weights
    at run time, so a column-wise TP shard of ``wq``/``wq_b``/``wkv_b`` works unchanged.

    Args:
        dim: model width.
        n_heads: attention heads.
        q_lora_rank: width of the query latent; 0 for a plain ``wq``.
        kv_lora_rank: width of the key/value latent.
        qk_nope_head_dim: per-head key/query width without position.
        qk_rope_head_dim: per-head (query) and shared (key) width that RoPE turns.
        v_head_dim: per-head value width.
        softmax_scale: the attention's softmax scale (YaRN corrects it).
        eps: the latent norms' epsilon.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps=eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps=eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        self.k_pe_heads = SharedKeyBroadcast()
        self.sdpa = ScaledDotProductAttention(scale=softmax_scale)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, dim) -> (B, S, heads, nope + rope)."""
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        return q.unflatten(-1, (-1, self.nope_dim + self.rope_dim))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q_nope, q_pe = self.queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).unflatten(-1, (-1, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, .)
        q_pe = apply_rope(q_pe, *rope)
        k_pe = apply_rope(k_pe.unsqueeze(2), *rope)  # (B, S, 1, rope): one key for all heads
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, self.k_pe_heads(k_pe, k_nope.shape[2])), dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, .) -> (B, H, S, .)
        out = self.sdpa(q, k, v)  # (B, H, S, v_head_dim)
        return self.wo(out.transpose(1, 2).flatten(2))

    def init_weights(self, init_std: float) -> None:
        """Input projections at std 0.02, the output projection at the depth-scaled std."""
        for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name).weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        self.kv_norm.reset_parameters()
        if hasattr(self, "q_norm"):
            self.q_norm.reset_parameters()

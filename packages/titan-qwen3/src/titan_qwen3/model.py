"""Qwen3, dense and MoE, built from titan-core's shared decoder. Single-device PyTorch:
parallelism and compile are applied from outside by ``parallelize.py``."""

from __future__ import annotations

from torch import nn

from titan_core.models import MoE, QKNormAttention, Transformer, TransformerBlock
from titan_qwen3.args import Qwen3Args


class Qwen3Block(TransformerBlock):
    """The shared pre-norm block; diff with Llama: queries and keys are RMS-normalised per head
    (``attention.q_norm``, ``attention.k_norm``, one ``head_dim`` scale each) before RoPE, and
    Qwen3-MoE's sparse layers hold a mixture of experts (``moe``) instead of ``feed_forward``."""

    def build_attention(self, args: Qwen3Args) -> QKNormAttention:
        return QKNormAttention(
            args.dim, args.n_heads, args.n_kv_heads, args.head_dim, eps=args.norm_eps
        )

    def build_feed_forward(self, layer_id: int, args: Qwen3Args) -> nn.Module:
        if args.is_moe_layer(layer_id):
            return MoE(args.dim, args.moe)
        return super().build_feed_forward(layer_id, args)


class Qwen3Transformer(Transformer):
    """The Qwen3 decoder: tokens (B, S) -> logits (B, S, vocab); plain RoPE at theta 1e6."""

    args: Qwen3Args
    block_cls = Qwen3Block

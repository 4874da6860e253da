"""DeepSeek V3, built from titan-core's shared decoder, multi-head latent attention and MoE.
Single-device PyTorch: parallelism and compile are applied from outside by ``parallelize.py``."""

from __future__ import annotations

from torch import nn

from titan_core.models import (
    MoE,
    MultiHeadLatentAttention,
    RoPE,
    Transformer,
    TransformerBlock,
    YarnRoPE,
)
from titan_deepseek.args import DeepSeekV3Args


class DeepSeekV3Block(TransformerBlock):
    """The shared pre-norm block; diff with Llama: multi-head latent attention, and a mixture of
    experts (``moe``, with shared experts) after the first ``n_dense_layers`` dense layers."""

    def build_attention(self, args: DeepSeekV3Args) -> MultiHeadLatentAttention:
        return MultiHeadLatentAttention(
            args.dim,
            args.n_heads,
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_nope_head_dim=args.qk_nope_head_dim,
            qk_rope_head_dim=args.qk_rope_head_dim,
            v_head_dim=args.v_head_dim,
            softmax_scale=args.softmax_scale,
            eps=args.norm_eps,
        )

    def build_feed_forward(self, layer_id: int, args: DeepSeekV3Args) -> nn.Module:
        if args.is_moe_layer(layer_id):
            return MoE(args.dim, args.moe)
        return super().build_feed_forward(layer_id, args)


class DeepSeekV3Transformer(Transformer):
    """The DeepSeek V3 decoder: tokens (B, S) -> logits (B, S, vocab); RoPE over the
    ``qk_rope_head_dim`` part of queries and keys, YaRN when the args say so."""

    args: DeepSeekV3Args
    block_cls = DeepSeekV3Block

    def build_rope(self, args: DeepSeekV3Args) -> RoPE:
        if args.rope_scaling is None:
            return super().build_rope(args)
        return YarnRoPE(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)

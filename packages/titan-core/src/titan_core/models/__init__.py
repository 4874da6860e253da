"""Model building blocks shared by every family: norms, RoPE variants, attention, SwiGLU, the
mixture of experts (``titan_core.models.moe``), and the pre-norm decoder they compose into."""

from titan_core.models.attention import Attention, QKNormAttention, ScaledDotProductAttention
from titan_core.models.feed_forward import FeedForward, swiglu_hidden_dim
from titan_core.models.mla import MultiHeadLatentAttention
from titan_core.models.moe import MoE, MoEArgs
from titan_core.models.norms import RMSNorm
from titan_core.models.rope import (
    Llama3RoPE,
    Llama3RopeScaling,
    RoPE,
    YarnRoPE,
    YarnScaling,
    apply_rope,
)
from titan_core.models.transformer import DecoderArgs, Transformer, TransformerBlock

__all__ = [
    "Attention",
    "DecoderArgs",
    "FeedForward",
    "Llama3RoPE",
    "Llama3RopeScaling",
    "MoE",
    "MoEArgs",
    "MultiHeadLatentAttention",
    "QKNormAttention",
    "RMSNorm",
    "RoPE",
    "ScaledDotProductAttention",
    "Transformer",
    "TransformerBlock",
    "YarnRoPE",
    "YarnScaling",
    "apply_rope",
    "swiglu_hidden_dim",
]

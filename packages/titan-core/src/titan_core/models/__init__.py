"""Model building blocks shared by every family: norms, RoPE variants, attention, SwiGLU."""

from titan_core.models.attention import Attention, ScaledDotProductAttention
from titan_core.models.feed_forward import FeedForward, swiglu_hidden_dim
from titan_core.models.norms import RMSNorm
from titan_core.models.rope import Llama3RoPE, Llama3RopeScaling, RoPE, apply_rope

__all__ = [
    "Attention",
    "FeedForward",
    "Llama3RoPE",
    "Llama3RopeScaling",
    "RMSNorm",
    "RoPE",
    "ScaledDotProductAttention",
    "apply_rope",
    "swiglu_hidden_dim",
]

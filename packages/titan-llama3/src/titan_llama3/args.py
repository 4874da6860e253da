"""Llama 3 model arguments and the named flavors."""

from __future__ import annotations

from dataclasses import dataclass

from titan_core.models import Llama3RopeScaling, swiglu_hidden_dim


@dataclass(kw_only=True, frozen=True)
class Llama3Args:
    """Architecture of one Llama 3 model; nothing about training."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    # Explicit sizes, for checkpoints whose shapes the flavor rules above do not produce (any
    # HF config.json): None derives them from dim, n_heads, multiple_of and ffn_dim_multiplier.
    ffn_hidden_dim: int | None = None
    head_dim_override: int | None = None

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Inner width of the SwiGLU feed-forward."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return swiglu_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


LLAMA3_FLAVORS: dict[str, Llama3Args] = {
    # A few million parameters: trains on a 2-core CPU in a minute; vocab fits the embedded
    # tokenizer. 8 kv heads of 16 keep GQA in play and divide by TP degrees up to 8.
    "debugmodel": Llama3Args(
        dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2048, max_seq_len=2048
    ),
    # Llama 3.2 shapes (tied embeddings, 32x RoPE scaling).
    "1B": Llama3Args(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.5,
        rope_scaling=Llama3RopeScaling(factor=32.0),
        tie_word_embeddings=True,
    ),
    "3B": Llama3Args(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        ffn_dim_multiplier=1.0,
        rope_scaling=Llama3RopeScaling(factor=32.0),
        tie_word_embeddings=True,
    ),
    # Llama 3.1 shapes (8x RoPE scaling).
    "8B": Llama3Args(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=Llama3RopeScaling(),
    ),
    "70B": Llama3Args(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=Llama3RopeScaling(),
    ),
    "405B": Llama3Args(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=Llama3RopeScaling(),
    ),
}

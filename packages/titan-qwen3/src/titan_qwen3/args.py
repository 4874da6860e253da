"""Qwen3 dense model arguments and the named flavors (the shapes of the released checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, frozen=True)
class Qwen3Args:
    """Architecture of one Qwen3 dense model; nothing about training.

    Every size is explicit (Qwen3's ``head_dim`` is 128 whatever ``dim / n_heads`` is, and its
    feed-forward width follows no formula), so a flavor reads like the model's config.json.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 128
    hidden_dim: int
    vocab_size: int = 151936
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 40960
    tie_word_embeddings: bool = False


QWEN3_FLAVORS: dict[str, Qwen3Args] = {
    # A few million parameters: trains on a 2-core CPU in a minute; vocab fits the embedded
    # tokenizer. head_dim 64 != dim / n_heads = 32, as in the real models (q is wider than dim);
    # 4 kv heads of 8 keep GQA in play and divide by TP degrees up to 4. Untied, so pipeline
    # parallel runs on it (tied weights cannot be split across stages).
    "debugmodel": Qwen3Args(
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        head_dim=64,
        hidden_dim=768,
        vocab_size=2048,
        max_seq_len=2048,
    ),
    # Qwen/Qwen3-{0.6B,1.7B,4B}: tied embeddings.
    "0.6B": Qwen3Args(
        dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072, tie_word_embeddings=True
    ),
    "1.7B": Qwen3Args(
        dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144, tie_word_embeddings=True
    ),
    "4B": Qwen3Args(
        dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728, tie_word_embeddings=True
    ),
    # Qwen/Qwen3-{8B,14B,32B}: separate output projection.
    "8B": Qwen3Args(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288),
    "14B": Qwen3Args(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408),
    "32B": Qwen3Args(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600),
}

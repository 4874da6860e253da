"""Qwen3 model arguments, dense and MoE, and the named flavors (the shapes of the released
checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

from titan_core.models.moe import MoEArgs


@dataclass(kw_only=True, frozen=True)
class Qwen3Args:
    """Architecture of one Qwen3 model, dense or MoE; nothing about training (the MoE
    load-balancing weights aside, see :class:`~titan_core.models.moe.MoEArgs`).

    Every size is explicit (Qwen3's ``head_dim`` is 128 whatever ``dim / n_heads`` is, and its
    feed-forward width follows no formula), so a flavor reads like the model's config.json.

    Qwen3-MoE (``moe`` set): layer i is an MoE layer when ``(i + 1) % decoder_sparse_step == 0``
    and i is not in ``mlp_only_layers`` (transformers' ``Qwen3MoeConfig``); the other layers
    are dense SwiGLUs of width ``hidden_dim``.
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
    moe: MoEArgs | None = None
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # NOTE: args read back from JSON (a checkpoint's titan.json) hold a list here.
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if self.decoder_sparse_step < 1:
            raise ValueError(
                f"Qwen3Args.decoder_sparse_step={self.decoder_sparse_step} must be at least 1"
            )

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` is a mixture of experts (else a dense SwiGLU)."""
        return (
            self.moe is not None
            and (layer_id + 1) % self.decoder_sparse_step == 0
            and layer_id not in self.mlp_only_layers
        )


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
    # Qwen3-MoE. A few million parameters, the debugmodel's attention; 8 experts of width 256,
    # top-2 (EP degrees up to 8 divide them), renormalised as in the released models. Layer 0
    # is dense (mlp_only_layers), so every layout also meets a model mixing both kinds. Both
    # load-balancing mechanisms are on, so every test exercises them: the expert-bias update
    # (torchtitan's 1e-3) and Qwen3-MoE's auxiliary loss (its router_aux_loss_coef, 1e-3).
    "debugmodel_moe": Qwen3Args(
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        head_dim=64,
        hidden_dim=768,
        vocab_size=2048,
        max_seq_len=2048,
        moe=MoEArgs(
            num_experts=8,
            top_k=2,
            hidden_dim=256,
            norm_topk_prob=True,
            load_balance_coeff=1e-3,
            aux_loss_coef=1e-3,
        ),
        mlp_only_layers=(0,),
    ),
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B: every layer sparse, 128 experts, top-8,
    # renormalised, the auxiliary loss at config.json's router_aux_loss_coef and no expert
    # bias (the released models have none). hidden_dim is config.json's intermediate_size,
    # the width a dense layer would have (none is, unless mlp_only_layers says so).
    "30B-A3B": Qwen3Args(
        dim=2048,
        n_layers=48,
        n_heads=32,
        n_kv_heads=4,
        hidden_dim=6144,
        moe=MoEArgs(
            num_experts=128, top_k=8, hidden_dim=768, norm_topk_prob=True, aux_loss_coef=1e-3
        ),
    ),
    # NOTE: rope theta 1e6 as Qwen/Qwen3-235B-A22B's config.json (torchtitan's 5e6 is that of
    # the later Qwen3-235B-A22B-*-2507 releases, same shapes).
    "235B-A22B": Qwen3Args(
        dim=4096,
        n_layers=94,
        n_heads=64,
        n_kv_heads=4,
        hidden_dim=12288,
        moe=MoEArgs(
            num_experts=128, top_k=8, hidden_dim=1536, norm_topk_prob=True, aux_loss_coef=1e-3
        ),
    ),
}

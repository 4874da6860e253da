"""DeepSeek V3 model arguments and the named flavors."""

from __future__ import annotations

from dataclasses import dataclass

from titan_core.models import MoEArgs, YarnScaling


@dataclass(kw_only=True, frozen=True)
class DeepSeekV3Args:
    """Architecture of one DeepSeek V3 model (names follow torchtitan; HF names in brackets).

    Layers ``0 .. n_dense_layers - 1`` [first_k_dense_replace] are dense SwiGLUs of width
    ``hidden_dim`` [intermediate_size]; the others are mixtures of experts (``moe``). Attention
    is multi-head latent attention (:class:`~titan_core.models.MultiHeadLatentAttention`);
    ``q_lora_rank`` 0 means a plain query projection. ``rope_scaling`` is YaRN or None.
    """

    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    vocab_size: int
    moe: MoEArgs
    n_dense_layers: int = 1
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_seq_len: int = 4096
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(
                f"DeepSeekV3Args.n_dense_layers={self.n_dense_layers} must be in "
                f"[0, n_layers={self.n_layers}]"
            )

    @property
    def n_kv_heads(self) -> int:
        """MLA gives every head its own key and value (rebuilt from the shared latent)."""
        return self.n_heads

    @property
    def head_dim(self) -> int:
        """The width RoPE turns (its tables are built for it), as HF's ``head_dim``."""
        return self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``1 / sqrt(qk head dim)``, times YaRN's correction."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope_scaling is not None:
            scale *= self.rope_scaling.softmax_scale_factor()
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers


# YaRN of the released V3 (config.json rope_scaling): 4K pretraining context extended 40x.
V3_YARN = YarnScaling(
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    mscale=1.0,
    mscale_all_dim=1.0,
)

DEEPSEEK_V3_FLAVORS: dict[str, DeepSeekV3Args] = {
    # torchtitan's debug shapes: a few million parameters, vocab fitting the embedded tokenizer;
    # 8 experts of width 256, 2 shared, top-3 softmax routing; layer 0 dense. The expert-bias
    # update is on (1e-3) so every test exercises it. Plain RoPE (no YaRN at this length).
    "debugmodel": DeepSeekV3Args(
        dim=256,
        n_layers=6,
        n_heads=16,
        hidden_dim=1024,
        vocab_size=2048,
        n_dense_layers=1,
        moe=MoEArgs(
            num_experts=8,
            top_k=3,
            hidden_dim=256,
            num_shared_experts=2,
            load_balance_coeff=1e-3,
        ),
        kv_lora_rank=512,
        max_seq_len=2048,
    ),
    # deepseek-ai/DeepSeek-V2-Lite shapes (torchtitan's 16B): no q-LoRA, 64 experts, top-6.
    "16B": DeepSeekV3Args(
        dim=2048,
        n_layers=27,
        n_heads=16,
        hidden_dim=10944,
        vocab_size=102400,
        moe=MoEArgs(
            num_experts=64, top_k=6, hidden_dim=1408, num_shared_experts=2, load_balance_coeff=1e-3
        ),
    ),
    # deepseek-ai/DeepSeek-V2 shapes (torchtitan's 236B): q-LoRA 1536, 160 experts in 8 groups,
    # a token picks from 3 groups, routing weights scaled by 16.
    "236B": DeepSeekV3Args(
        dim=5120,
        n_layers=60,
        n_heads=128,
        hidden_dim=12288,
        vocab_size=102400,
        q_lora_rank=1536,
        moe=MoEArgs(
            num_experts=160,
            top_k=6,
            hidden_dim=1536,
            num_shared_experts=2,
            n_group=8,
            topk_group=3,
            route_scale=16.0,
            load_balance_coeff=1e-3,
        ),
    ),
    # deepseek-ai/DeepSeek-V3: 3 dense layers, 256 sigmoid-routed experts in 8 groups (top-4
    # groups, top-8 experts, renormalised, x2.5), one shared expert, YaRN to 160K.
    "671B": DeepSeekV3Args(
        dim=7168,
        n_layers=61,
        n_heads=128,
        hidden_dim=18432,
        vocab_size=129280,
        n_dense_layers=3,
        q_lora_rank=1536,
        moe=MoEArgs(
            num_experts=256,
            top_k=8,
            hidden_dim=2048,
            num_shared_experts=1,
            score_func="sigmoid",
            norm_topk_prob=True,
            route_scale=2.5,
            n_group=8,
            topk_group=4,
            load_balance_coeff=1e-3,
        ),
        rope_scaling=V3_YARN,
        max_seq_len=163840,
    ),
}

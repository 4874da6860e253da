"""DeepSeek V3 for titan: model, flavors, parallelize plan, HF adapter.

Installing this package registers the ``deepseek_v3`` model (entry point ``titan.models``).
"""

from types import SimpleNamespace

from titan_core import TrainSpec
from titan_core.metrics import decoder_flops_per_token
from titan_core.moe_training import moe_after_optimizer_step, moe_aux_loss
from titan_core.parallel.pipeline import build_pipeline
from titan_deepseek.args import DEEPSEEK_V3_FLAVORS, DeepSeekV3Args
from titan_deepseek.hf_adapter import DeepSeekV3StateDictAdapter
from titan_deepseek.model import DeepSeekV3Transformer
from titan_deepseek.parallelize import parallelize_deepseek_v3


def deepseek_v3_flops_per_token(args: DeepSeekV3Args, num_params: int, seq_len: int) -> float:
    """The decoder count, with MLA's attention at the mean of its q.k and value head widths."""
    qk_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
    view = SimpleNamespace(
        vocab_size=args.vocab_size,
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        head_dim=(qk_dim + args.v_head_dim) / 2,
        tie_word_embeddings=args.tie_word_embeddings,
        moe=args.moe,
        is_moe_layer=args.is_moe_layer,
    )
    return decoder_flops_per_token(view, num_params, seq_len)


train_spec = TrainSpec(
    name="deepseek_v3",
    flavors=DEEPSEEK_V3_FLAVORS,
    model_cls=DeepSeekV3Transformer,
    parallelize_fn=parallelize_deepseek_v3,
    pipelining_fn=build_pipeline,
    state_dict_adapter=DeepSeekV3StateDictAdapter(),
    flops_per_token_fn=deepseek_v3_flops_per_token,
    aux_loss_fn=moe_aux_loss,
    post_optimizer_fn=moe_after_optimizer_step,
)

__all__ = [
    "DEEPSEEK_V3_FLAVORS",
    "DeepSeekV3Args",
    "DeepSeekV3StateDictAdapter",
    "DeepSeekV3Transformer",
    "parallelize_deepseek_v3",
    "train_spec",
]

"""Qwen3 dense for titan: model, flavors, parallelize plan, HF adapter.

Installing this package registers the ``qwen3`` model (entry point ``titan.models``).
"""

from titan_core import TrainSpec
from titan_core.metrics import llama_flops_per_token
from titan_core.parallel.pipeline import build_pipeline
from titan_qwen3.args import QWEN3_FLAVORS, Qwen3Args
from titan_qwen3.hf_adapter import Qwen3StateDictAdapter
from titan_qwen3.model import Qwen3Transformer
from titan_qwen3.parallelize import parallelize_qwen3


def flops_per_token(args: Qwen3Args, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token (see ``titan_core.metrics.llama_flops_per_token``).

    NOTE: a tied table is counted once in ``num_params`` and is then the output matmul (its
    lookup is free), so nothing is subtracted for it; an untied table is a lookup only.
    """
    embedding = 0 if args.tie_word_embeddings else args.vocab_size * args.dim
    return llama_flops_per_token(
        num_params, embedding, args.n_layers, args.n_heads, args.head_dim, seq_len
    )


train_spec = TrainSpec(
    name="qwen3",
    flavors=QWEN3_FLAVORS,
    model_cls=Qwen3Transformer,
    parallelize_fn=parallelize_qwen3,
    pipelining_fn=build_pipeline,
    state_dict_adapter=Qwen3StateDictAdapter(),
    flops_per_token_fn=flops_per_token,
)

__all__ = [
    "QWEN3_FLAVORS",
    "Qwen3Args",
    "Qwen3StateDictAdapter",
    "Qwen3Transformer",
    "parallelize_qwen3",
    "train_spec",
]

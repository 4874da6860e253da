"""Qwen3 dense for titan: model, flavors, parallelize plan, HF adapter.

Installing this package registers the ``qwen3`` model (entry point ``titan.models``).
"""

from titan_core import TrainSpec
from titan_core.metrics import decoder_flops_per_token
from titan_core.parallel.pipeline import build_pipeline
from titan_qwen3.args import QWEN3_FLAVORS, Qwen3Args
from titan_qwen3.hf_adapter import Qwen3StateDictAdapter
from titan_qwen3.model import Qwen3Transformer
from titan_qwen3.parallelize import parallelize_qwen3

train_spec = TrainSpec(
    name="qwen3",
    flavors=QWEN3_FLAVORS,
    model_cls=Qwen3Transformer,
    parallelize_fn=parallelize_qwen3,
    pipelining_fn=build_pipeline,
    state_dict_adapter=Qwen3StateDictAdapter(),
    flops_per_token_fn=decoder_flops_per_token,
)

__all__ = [
    "QWEN3_FLAVORS",
    "Qwen3Args",
    "Qwen3StateDictAdapter",
    "Qwen3Transformer",
    "parallelize_qwen3",
    "train_spec",
]

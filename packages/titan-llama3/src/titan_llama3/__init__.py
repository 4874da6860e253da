"""Llama 3 / 3.1 / 3.2 for titan: model, flavors, parallelize plan, HF adapter.

Installing this package registers the ``llama3`` model (entry point ``titan.models``).
"""

from titan_core import TrainSpec
from titan_core.metrics import decoder_flops_per_token
from titan_core.parallel.pipeline import build_pipeline
from titan_llama3.args import LLAMA3_FLAVORS, Llama3Args
from titan_llama3.hf_adapter import Llama3StateDictAdapter
from titan_llama3.model import Transformer
from titan_llama3.parallelize import parallelize_llama

train_spec = TrainSpec(
    name="llama3",
    flavors=LLAMA3_FLAVORS,
    model_cls=Transformer,
    parallelize_fn=parallelize_llama,
    pipelining_fn=build_pipeline,
    state_dict_adapter=Llama3StateDictAdapter(),
    flops_per_token_fn=decoder_flops_per_token,
)

__all__ = [
    "LLAMA3_FLAVORS",
    "Llama3Args",
    "Llama3StateDictAdapter",
    "Transformer",
    "parallelize_llama",
    "train_spec",
]

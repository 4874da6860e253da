"""Qwen3 dense and MoE for titan: model, flavors, parallelize plan, HF adapter.

Installing this package registers the ``qwen3`` model (entry point ``titan.models``).
"""

from titan_core import TrainSpec
from titan_core.metrics import decoder_flops_per_token
from titan_core.moe_training import moe_after_optimizer_step, moe_aux_loss
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
    # Qwen3-MoE flavors: the load-balancing loss and the expert-bias update (no-ops when dense).
    aux_loss_fn=moe_aux_loss,
    post_optimizer_fn=moe_after_optimizer_step,
)

__all__ = [
    "QWEN3_FLAVORS",
    "Qwen3Args",
    "Qwen3StateDictAdapter",
    "Qwen3Transformer",
    "parallelize_qwen3",
    "train_spec",
]

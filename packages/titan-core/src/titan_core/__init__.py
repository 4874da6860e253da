"""titan-core: PyTorch-native LLM pretraining with composable N-D parallelism.

Public API: ``TrainSpec``, ``get_train_spec``, ``register_train_spec``, ``load_pretrained``,
``StateDictAdapter`` (a model family's Hugging Face format), ``UserError``.
"""

from titan_core.errors import UserError
from titan_core.hf import StateDictAdapter
from titan_core.train_spec import TrainSpec, available_models, get_train_spec, register_train_spec

__all__ = [
    "StateDictAdapter",
    "TrainSpec",
    "UserError",
    "available_models",
    "get_train_spec",
    "load_pretrained",
    "register_train_spec",
]


def load_pretrained(path, device="cpu"):
    """See :func:`titan_core.pretrained.load_pretrained` (imported on use: it needs DCP)."""
    from titan_core.pretrained import load_pretrained as load

    return load(path, device)

"""titan-core: PyTorch-native LLM pretraining with composable N-D parallelism.

Public API: ``TrainSpec``, ``get_train_spec``, ``register_train_spec``, ``UserError``.
"""

from titan_core.errors import UserError
from titan_core.train_spec import TrainSpec, available_models, get_train_spec, register_train_spec

__all__ = ["TrainSpec", "UserError", "available_models", "get_train_spec", "register_train_spec"]

"""torchao, imported quietly and only when a converter needs it, and the hardware it needs.

NOTE: importing torchao on a machine without its CUDA extensions logs "Failed to load ..." lines
(logger ``torchao``) and torch logs pytree deprecation warnings for torchao's enums (logger
``torch.utils._pytree``). A command that promises one-line errors keeps them out of sight: the
import runs with those loggers raised to ERROR.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

import torch

from titan_core.errors import UserError

_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Raise torchao's and pytree's loggers to ERROR for the duration (imports, conversions)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def import_torchao(module: str, converter: str) -> ModuleType:
    """``import torchao.<module>`` quietly; a UserError naming the converter if it is missing."""
    with quiet_torchao():
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise UserError(
                f"model.converters: {converter} needs torchao ({e}); pip install torchao"
            ) from None


def require_capability(
    device: torch.device, minimum: tuple[int, int], converter: str, fix: str
) -> None:
    """On CUDA, refuse a GPU older than ``minimum`` (compute capability) in one line."""
    if device.type != "cuda":
        return
    found = cuda_capability(device)
    if found < minimum:
        name = torch.cuda.get_device_name(device)
        raise UserError(
            f"model.converters: {converter} needs a CUDA compute capability >= "
            f"{minimum[0]}.{minimum[1]}, but {name} has {found[0]}.{found[1]}; {fix}"
        )


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability (a function of its own so tests can stand in a GPU)."""
    return torch.cuda.get_device_capability(device)

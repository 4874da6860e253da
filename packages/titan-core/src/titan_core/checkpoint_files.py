"""What a titan checkpoint folder holds, and how its description is read.

The lowest layer of checkpoint code, imported by everything that opens a checkpoint (the
Checkpointer, the HF export, ``load_pretrained``, titan-convert) and importing none of them:

- ``<folder>/step-N/``: DCP shards, ``.metadata`` (read only through
  :mod:`titan_core.checkpoint_safety`), ``titan.json`` (what the checkpoint is) and
  ``tokenizer/`` (the files of the tokenizer the run used, so the checkpoint is enough to run);
- the model args ``titan.json`` stores, rebuilt as the family's args dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from titan_core.errors import UserError
from titan_core.train_spec import TrainSpec

METADATA_FILE = ".metadata"
META_FILE = "titan.json"
TOKENIZER_DIR = "tokenizer"
TOKEN_IDS = "tokenizer_ids"
"""``titan.json`` key: the run's tokenizer as config.json spells it (``bos_token_id``,
``eos_token_id``, ``pad_token_id``, ``vocab_size``)."""
STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_steps(folder: Path) -> list[int]:
    """Steps of the checkpoints in ``folder`` that are complete (both metadata files), sorted."""
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / ".metadata").is_file() and (path / META_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step-{step}"


NO_DIST_WARNING = "torch.distributed is disabled"


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """DCP warns on every save or load outside a process group (even with ``no_dist=True``);
    a one-process run or conversion means exactly that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
        yield


def read_meta(folder: Path) -> dict[str, Any]:
    """A checkpoint's ``titan.json``."""
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise UserError(f"{path} names no model; the checkpoint is damaged")
    return meta


def _dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)``, building nested dataclass fields (e.g. RoPE scaling) from dicts."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(
            f"{where}: model_args has fields {unknown} that {cls.__name__} lacks; the "
            "checkpoint is from a newer titan or another model (upgrade the model package)"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        nested = [t for t in typing.get_args(hints[name]) if dataclasses.is_dataclass(t)]
        if dataclasses.is_dataclass(hints[name]):
            nested = [hints[name]]
        if isinstance(value, dict) and nested:
            value = _dataclass_from_dict(nested[0], value, where)
        kwargs[name] = value
    return cls(**kwargs)


def model_args_of(spec: TrainSpec, meta: dict[str, Any], where: str) -> Any:
    """The model args a checkpoint's ``titan.json`` stores (its flavor's, if it stores none)."""
    saved = meta.get("model_args") or {}
    flavor = meta.get("flavor")
    if saved:
        cls = type(next(iter(spec.flavors.values())))
        return _dataclass_from_dict(cls, saved, where)
    if flavor not in spec.flavors:
        raise UserError(
            f"{where} is {meta.get('model')} flavor '{flavor}', which the installed package "
            f"does not have (flavors: {', '.join(spec.flavors)})"
        )
    return spec.flavors[flavor]


def plain_tensor(value: Any) -> Any:
    """The high-precision tensor under a converter's weight wrapper, sharing its storage.

    torchao's training tensors (Float8 all-gather weights, MX/float8 grouped-mm weights) wrap
    the real weight; saved as they are, DCP would pickle the wrapper class into the checkpoint.
    Saving (and loading in place into) the wrapped tensor keeps checkpoints the same with or
    without a converter. A DTensor keeps its mesh and placements around the unwrapped shard.
    """
    import torch
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        local = value._local_tensor
        inner = _unwrap(local)
        if inner is local:
            return value
        return DTensor.from_local(
            inner, value.device_mesh, value.placements, shape=value.shape, stride=value.stride()
        )
    return _unwrap(value) if isinstance(value, torch.Tensor) else value


def _unwrap(tensor: Any) -> Any:
    """Follow single-tensor subclass wrappers (``__tensor_flatten__``) of the same shape."""
    import torch

    while type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(
        tensor, "__tensor_flatten__"
    ):
        names, _ = tensor.__tensor_flatten__()
        if len(names) != 1:
            break
        inner = getattr(tensor, names[0])
        if inner.shape != tensor.shape:
            break
        tensor = inner
    return tensor

"""What titan refuses to read from a checkpoint, and checkpoint folders a save would fail in.

DCP's ``FileSystemReader`` unpickles ``.metadata`` with plain :mod:`pickle`, and its default load
planner ``torch.load``\\ s a non-tensor entry with ``weights_only=False``: a crafted checkpoint
would run its payload the moment it is opened. Everything titan loads from a checkpoint goes
through this module instead:

- ``.metadata`` is unpickled by :class:`_MetadataUnpickler`, which resolves only the classes DCP
  writes into it (``Metadata``, ``TensorStorageMetadata`` ...; the list comes from unpickling real
  titan checkpoints) and refuses any other global with :class:`UnsafeCheckpointError`;
- the shard files a ``.metadata`` points at must lie in the checkpoint's own folder;
- :class:`TensorOnlyLoadPlanner` refuses an entry stored as pickled bytes (titan saves tensors
  only); tensors themselves are read by DCP with ``torch.load(weights_only=True)``.

The folder checks run before a run builds a model or writes to its dump folder: a file where a
``step-N`` folder goes, a checkpoint of another model.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from titan_core.checkpoint_files import META_FILE, METADATA_FILE, STEP_DIR
from titan_core.errors import UserError

logger = logging.getLogger("titan")

PARTIAL_DIR = re.compile(r"^\.step-(\d+)\.partial$")

_DCP = "torch.distributed.checkpoint"
_PATHS = ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
# (module, name) -> the object a DCP .metadata may name. StorageMeta.checkpoint_id is the Path
# the writer was given; pathlib moved its classes to pathlib._local in Python 3.13.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{
        (f"{_DCP}.metadata", cls.__name__): cls
        for cls in (
            Metadata,
            TensorStorageMetadata,
            BytesStorageMetadata,
            ChunkStorageMetadata,
            TensorProperties,
            MetadataIndex,
            StorageMeta,
            _MEM_FORMAT_ENCODING,
        )
    },
    (f"{_DCP}.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): OrderedDict,
    **{(m, name): getattr(pathlib, name) for m in ("pathlib", "pathlib._local") for name in _PATHS},
}
# torch.float32 and friends are pickled by name as attributes of the torch module.
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)


class UnsafeCheckpointError(UserError):
    """A checkpoint holds something titan never writes and will not run (a pickled object of a
    foreign class, a shard outside its folder): an attack or a foreign file, not damage, so it
    is never skipped like a corrupt checkpoint."""


def _refusal(file: Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint: {file} holds {what}; refusing to run code from a checkpoint (titan never "
        f"writes this): delete {file.parent} or replace it with a checkpoint from a trusted source"
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP's own ``.metadata`` files name."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_ENUMS):
            return getattr(torch, name)
        raise _refusal(self.path, f"a pickled object titan does not load ({module}.{name})")

    def persistent_load(self, pid: Any) -> Any:
        raise _refusal(self.path, "a persistent pickle reference")


def read_metadata_file(path: Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file with the restricted unpickler and check it.

    Raises:
        UnsafeCheckpointError: it names a class DCP does not write, or a shard outside its folder.
        OSError, pickle.UnpicklingError, EOFError, ValueError: it is missing or damaged.
    """
    with open(path, "rb") as file:
        metadata = _MetadataUnpickler(file, path).load()
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{path} is not a DCP metadata file ({type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name != os.path.basename(name) or name in ("", ".", ".."):
            raise _refusal(path, f"a shard path outside its folder ({name!r})")
    return metadata


def read_dcp_metadata(folder: Path) -> Metadata:
    """The DCP index of the checkpoint ``folder`` (see :func:`read_metadata_file`)."""
    return read_metadata_file(Path(folder) / METADATA_FILE)


class SafeFileSystemReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` whose ``.metadata`` goes through the restricted unpickler, read
    once however many loads use the reader."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._metadata: dict[Any, Metadata] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._metadata.clear()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            path = Path(self._get_metadata_path(rank))
            self._metadata[rank] = read_metadata_file(path)
        metadata = self._metadata[rank]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, except that an entry stored as pickled bytes is refused: titan
    saves tensors only, and DCP would ``torch.load(weights_only=False)`` it."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def load_bytes(self, read_item: Any, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        raise _refusal(self.folder / METADATA_FILE, f"{fqn} as a pickled object, not a tensor")


def refusal_in(error: BaseException) -> UserError | None:
    """The :class:`UserError` a rank raised inside DCP (which wraps every rank's failure)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, CheckpointException):
        for exc, _trace in error.failures.values():
            if isinstance(exc, UserError):
                return exc
    return None


def load_checkpoint(
    state: dict[str, Any],
    folder: Path,
    no_dist: bool = False,
    reader: SafeFileSystemReader | None = None,
) -> None:
    """``dcp.load(state)`` from ``folder`` in place, without running code from it.

    Args:
        state: the tensors to fill, keyed as in the checkpoint (``{"model": {...}}``).
        folder: a ``step-N`` checkpoint folder.
        no_dist: load in this process alone, even inside a process group.
        reader: a reader of ``folder`` to reuse (its metadata is read once).

    Raises:
        UnsafeCheckpointError: the checkpoint holds an object titan does not load.
    """
    folder = Path(folder)
    reader = reader or SafeFileSystemReader(str(folder))
    # NOTE: read here first: DCP swallows a failed read of .metadata (it falls back to
    # per-rank files), which would hide the refusal behind "metadata is None".
    reader.read_metadata()
    try:
        dcp.load(
            state, storage_reader=reader, planner=TensorOnlyLoadPlanner(folder), no_dist=no_dist
        )
    except CheckpointException as e:
        refusal = refusal_in(e)
        if refusal is not None:
            raise refusal from None
        raise


# ---- what a checkpoint folder must be -----------------------------------------------------


def read_titan_json(path: Path) -> dict[str, Any]:
    """A checkpoint's ``titan.json``; a damaged one raises ValueError (not a UserError: resume
    falls back to an older checkpoint)."""
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{META_FILE} holds a {type(meta).__name__}, not an object")
    return meta


def check_checkpoint_folder(folder: Path) -> None:
    """Refuse, before anything is built or written, a checkpoint folder a later save would fail
    in (after the whole run); warn about ``step-N`` folders that are not complete checkpoints."""
    fix = "move it away or pick another job.dump_folder or checkpoint.folder"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"checkpoint.folder: {folder} is a file, not a folder; {fix}")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"checkpoint.folder: {existing} is not writable, so no save could be "
            f"written under it; fix its permissions or {fix}"
        )
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if not (STEP_DIR.match(path.name) or PARTIAL_DIR.match(path.name)):
            continue
        if not path.is_dir():
            raise UserError(
                f"checkpoint: {path} is not a folder, so the save of that step would fail at the "
                f"end of the run; {fix}"
            )
        missing = [f for f in (".metadata", META_FILE) if not (path / f).is_file()]
        if STEP_DIR.match(path.name) and missing:
            logger.warning(
                "checkpoint %s lacks %s: not a complete checkpoint, skipped (and kept: a save of "
                "that step moves it aside)",
                path,
                " and ".join(missing),
            )


def check_checkpoint_model(
    spec: Any, model_args: Any, path: Path, model_name: str, flavor: str
) -> None:
    """Refuse the checkpoint ``path`` if its tensors are not those of ``spec``'s model with
    ``model_args`` (the model is built on the meta device: no memory, no weights).

    Args:
        spec: the TrainSpec of the model the run builds.
        model_args: its args.
        path: a ``step-N`` folder.
        model_name, flavor: the config's model.name and model.flavor, for the message.

    Raises:
        UserError: another model or flavor (the differing tensors are listed), or a checkpoint
            holding code. A damaged ``titan.json`` or ``.metadata`` raises its own error.
    """
    meta = read_titan_json(path)
    with torch.device("meta"):  # the whole model: a pipeline rank holds only some of it
        whole = spec.model_cls(model_args)
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(whole).items()}
    stored = read_dcp_metadata(path).state_dict_metadata
    found = {
        k.removeprefix("model."): tuple(m.size)
        for k, m in stored.items()
        if k.startswith("model.") and hasattr(m, "size")
    }
    if found == expected:
        return
    _check_vocabulary(path, meta, found, expected)
    diffs = sorted(
        f"{k}: checkpoint {found.get(k, 'missing')} vs model {expected.get(k, 'missing')}"
        for k in set(found) | set(expected)
        if found.get(k) != expected.get(k)
    )
    shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise UserError(
        f"checkpoint: {path} holds {meta.get('model')} {meta.get('flavor')}, which does not "
        f"match {model_name} {flavor} ({shown}); use the checkpoint's model.name/model.flavor "
        "or another dump folder"
    )


_EMBEDDING = "tok_embeddings.weight"  # (vocab, dim) in every family


def _check_vocabulary(
    path: Path, meta: dict[str, Any], found: dict[str, tuple], expected: dict[str, tuple]
) -> None:
    """Refuse, naming the tokenizer, a checkpoint trained with another vocabulary: the model's
    vocab_size follows model.hf_assets_path's tokenizer."""
    ours, theirs = expected.get(_EMBEDDING), found.get(_EMBEDDING)
    if not ours or not theirs or ours[0] == theirs[0]:
        return
    tokenizer = meta.get("tokenizer") or "unrecorded"
    own = path / "tokenizer"
    fix = own if (own / "tokenizer.json").is_file() else tokenizer
    raise UserError(
        f"checkpoint: {path} has a vocabulary of {theirs[0]} tokens but the model has "
        f"{ours[0]} (vocab_size follows the tokenizer of model.hf_assets_path); train with the "
        f"checkpoint's tokenizer ({tokenizer}): --model.hf_assets_path {fix}, or use another "
        "job.dump_folder"
    )


def check_resume_source(
    folder: Path, steps: list[int], spec: Any, model_args: Any, model_name: str, flavor: str
) -> None:
    """Before the dump folder is touched: refuse a run whose newest readable checkpoint in
    ``steps`` (newest first) is of another model or holds code. Damaged ones are passed over
    here; resume reports them and falls back."""
    for step in steps:
        try:
            check_checkpoint_model(spec, model_args, folder / f"step-{step}", model_name, flavor)
        except UserError:
            raise
        except Exception:  # damaged: Checkpointer.resume warns and tries the next one
            continue
        return

"""Safetensors folders, read and written one tensor at a time.

An HF model folder holds its weights in ``model.safetensors`` or in shards named by
``model.safetensors.index.json``. A safetensors file is an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, byte range) and the raw tensor bytes, back to back; both
classes here work from the header, so they never hold more than the tensor asked for.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from titan_core.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def listing(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---- reading ---------------------------------------------------------------------------------

MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses a longer header
TensorEntry = tuple[torch.dtype, tuple[int, ...], int]
"""(dtype, shape, where its bytes start in the file) of one tensor of a safetensors file."""


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors file ``path``, from its header alone, checked so that no
    reader ever uses a byte of a damaged or crafted file.

    Checked: the header length; a UTF-8 JSON object without repeated names; each entry's dtype
    (one titan reads), shape (non-negative integers) and ``data_offsets`` (two integers spanning
    exactly the bytes the shape needs); and that the byte ranges tile the data exactly, as the
    safetensors library requires: from 0, no two sharing a byte, no gap, ending at the end of
    the file.

    Raises:
        UserError: one line naming the file, the tensor and what is wrong.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = _header_length(path, f.read(8), size)
        header = _parse_header(path, f.read(header_len))
    entries = {name: _entry(path, name, info) for name, info in header.items()}
    data_start = 8 + header_len
    _check_layout(path, entries, data_start, size)
    return {
        name: (dtype, shape, data_start + begin)
        for name, (dtype, shape, begin, _) in entries.items()
    }


def _header_length(path: Path, raw: bytes, size: int) -> int:
    if len(raw) < 8:
        raise UserError(f"{path} is truncated ({size} bytes, no header); download it again")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > MAX_HEADER_BYTES:
        raise UserError(
            f"{path} is not a safetensors file: its first 8 bytes give a header of {header_len} "
            f"bytes (the format allows {MAX_HEADER_BYTES}); download it again"
        )
    if 8 + header_len > size:
        raise UserError(
            f"{path} is truncated: its header needs {8 + header_len} bytes, the file has "
            f"{size}; download it again"
        )
    return header_len


class _RepeatedName(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a name given twice (json keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedName(key)
        out[key] = value
    return out


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The JSON header (``__metadata__`` checked and dropped): tensor name -> its entry."""
    bad = f"{path} is not a safetensors file:"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except UnicodeDecodeError:
        raise UserError(f"{bad} its header is not UTF-8 text; download it again") from None
    except _RepeatedName as e:
        raise UserError(f"{bad} its header names '{e}' twice; download it again") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{bad} its header is not JSON ({e}); download it again") from None
    if not isinstance(header, dict):
        raise UserError(f"{bad} its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{bad} its __metadata__ is {metadata!r}, not an object of strings")
    return header


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, info: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each field checked against the others."""
    where = f"{path}: tensor '{name}'"
    fields = ("dtype", "shape", "data_offsets")
    if not isinstance(info, dict):
        raise UserError(f"{where} is described by {info!r}, not an object of {', '.join(fields)}")
    missing = [k for k in fields if k not in info]
    if missing:
        raise UserError(f"{where} has no {' or '.join(missing)}; download the file again")
    dtype, shape, offsets = (info[k] for k in fields)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UserError(f"{where} has dtype {dtype!r}; titan reads {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise UserError(f"{where} has shape {shape!r}; expected a list of integers >= 0")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(map(_is_count, offsets))
        and offsets[0] <= offsets[1]
    ):
        raise UserError(
            f"{where} has data_offsets {offsets!r}; expected [begin, end], integers with "
            "0 <= begin <= end"
        )
    nbytes = _nbytes(shape, _DTYPES[dtype])
    if offsets[1] - offsets[0] != nbytes:
        raise UserError(
            f"{where} has data_offsets {offsets}, {offsets[1] - offsets[0]} bytes, but shape "
            f"{tuple(shape)} of {dtype} is {nbytes} bytes; the file is damaged or crafted"
        )
    return _DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def _check_layout(
    path: Path, entries: Mapping[str, tuple[Any, Any, int, int]], data_start: int, size: int
) -> None:
    """The tensors' byte ranges lie in the file and tile its data: no shared byte, no gap."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
    past = [(end, name) for _, end, name in spans if data_start + end > size]
    if past:
        end, name = max(past)
        raise UserError(
            f"{path} is truncated: its header describes {data_start + end} bytes, the file has "
            f"{size} (tensor '{name}' lies past its end); download it again"
        )
    for (b0, e0, n0), (b1, e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise UserError(
                f"{path}: tensors '{n0}' and '{n1}' share bytes (data_offsets [{b0}, {e0}] and "
                f"[{b1}, {e1}]); the file is damaged or crafted, download it again"
            )
    edge, before = 0, None
    for begin, end, name in spans:
        if begin > edge:
            raise UserError(
                f"{path}: data bytes [{edge}, {begin}) before tensor '{name}' belong to no "
                "tensor (the safetensors format allows no gaps); the file is damaged or crafted"
            )
        edge, before = end, name
    if data_start + edge != size:
        raise UserError(
            f"{path}: its last {size - data_start - edge} bytes (after tensor '{before}') belong "
            "to no tensor (the safetensors format allows none); the file is damaged or crafted"
        )


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a safetensors index, checked."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index} is not valid JSON ({e}); download it again") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(
            f"{index} is not a safetensors index: its weight_map is {weight_map!r}, expected an "
            "object of tensor name -> shard file"
        )
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise UserError(f"{index}: weight_map['{name}'] is {file!r}, expected a file name")
    return weight_map


def _shard_path(folder: Path, file: str, source: Path) -> Path:
    """``folder / file``, checked without opening it: a plain file name, and if a symlink, one
    into the folder (or, in a Hugging Face hub cache snapshot, into the repo's ``blobs``)."""
    if file in ("", ".", "..") or any(c in file for c in "/\\\0"):
        raise UserError(
            f"{source}: shard {file!r} is not a file name in {folder}; titan reads no file "
            "outside the model folder"
        )
    path = folder / file
    if path.is_symlink():
        target, home = path.resolve(), folder.resolve()
        # NOTE: the hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>.
        blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
        if home not in target.parents and target.parent != blobs:
            raise UserError(
                f"{path} is a symlink to {target}, outside {folder}; titan reads no file outside "
                "the model folder: copy the file in (or link the whole folder instead)"
            )
    return path


class HFReader:
    """The tensors of an HF folder, read one at a time (or a slice of one), never all at once.

    Opening checks the index (every shard a file in the folder, checked before any is opened)
    and every shard's header (see :func:`read_header`), so a damaged, crafted, missing or
    truncated file fails here, before any tensor byte is read.

    Args:
        folder: holds ``model.safetensors.index.json`` and its shards, or ``model.safetensors``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] | None = _read_index(index)
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).exists() or (self.folder / SINGLE_FILE).is_symlink():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise UserError(
                f"{self.folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}; only safetensors "
                "weights are supported (re-save .bin weights with safe_serialization=True)"
            )
        source = index if weight_map is not None else self.folder
        paths = {file: _shard_path(self.folder, file, source) for file in files}
        missing = [file for file, path in paths.items() if not path.is_file()]
        if missing:
            raise UserError(f"{source}: shards not found (or not files): {listing(missing)}")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.offsets: dict[str, int] = {}  # where each tensor's bytes start in its file
        for path in paths.values():
            for name, (dtype, shape, offset) in read_header(path).items():
                if name in self.files:
                    raise UserError(f"{path}: tensor '{name}' is also in {self.files[name]}")
                self.files[name], self.shapes[name] = path, shape
                self.dtypes[name], self.offsets[name] = dtype, offset
        if weight_map is not None:
            absent = sorted(k for k, f in weight_map.items() if self.files.get(k) != paths[f])
            if absent:
                raise UserError(f"{index} names tensors its shards lack: {listing(absent)}")

    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or only ``[rows, cols]`` of it, read from disk (no other bytes)."""
        shape, dtype = self.shapes[name], self.dtypes[name]
        start, stop, step = (rows or slice(None)).indices(shape[0] if shape else 1)
        if cols is not None or step != 1:
            from safetensors import safe_open

            with safe_open(self.files[name], framework="pt") as f:
                return f.get_slice(name)[rows or slice(None), cols or slice(None)]
        out_shape = (max(stop - start, 0), *shape[1:]) if shape else ()
        nbytes = _nbytes(out_shape, dtype)
        if nbytes == 0:
            return torch.empty(out_shape, dtype=dtype)
        # NOTE: whole rows are one byte range, mapped on its own: the tensor shares the page
        # cache's pages (no copy into fresh memory, which costs more than the read itself on
        # this VM), and the mapping ends with the tensor, so a streaming conversion holds one
        # tensor's pages at a time (mapping the whole file, as safetensors does, keeps every
        # page read so far resident). Private mapping: writing to the tensor never reaches the
        # file.
        offset = self.offsets[name] + start * (_nbytes(shape[1:], dtype) if shape else 0)
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.files[name], "rb") as f:
            mapped = mmap.mmap(
                f.fileno(), offset - base + nbytes, access=mmap.ACCESS_COPY, offset=base
            )
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=offset - base)
        return data.view(dtype).reshape(out_shape)

    def validate(
        self, expected: Mapping[str, Sequence[int]], ignorable: Collection[str] = ()
    ) -> None:
        """Refuse a folder whose tensors are not exactly ``expected`` (name -> shape), listing
        the missing, unexpected and wrong-shape tensors in one message. Names in ``ignorable``
        (a tied twin some hub folders store anyway) may be present; they are never read."""
        check_tensors(self.folder, self.shapes, expected, ignorable)


def check_tensors(
    folder: Path,
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, Sequence[int]],
    ignorable: Collection[str] = (),
) -> None:
    """:meth:`HFReader.validate` for any reader's ``shapes`` (name -> shape) of ``folder``."""
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected) - set(ignorable))
    wrong = sorted(
        f"{k} {shapes[k]} (expected {tuple(expected[k])})"
        for k in set(expected) & set(shapes)
        if shapes[k] != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected: {listing(extra)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {listing(wrong)}")
    if problems:
        raise UserError(
            f"{folder}: the tensors do not match config.json ({'; '.join(problems)}); "
            "fix config.json or download the weights again"
        )


# ---- writing ---------------------------------------------------------------------------------


class HFWriter:
    """Writes an HF folder's weights shard by shard, tensor by tensor, in any order.

    The layout is fixed up front: each shard's header is written at once and every tensor has
    its byte range, so :meth:`write` puts one tensor on disk and keeps nothing in memory.

    Args:
        out_dir: the folder to write (it must exist).
        tensors: HF name -> (shape, dtype) of every tensor, in the order to store them.
        max_shard_bytes: a shard holds at most this many bytes of tensors (one larger tensor
            gets a shard of its own).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        tensors: Mapping[str, tuple[Sequence[int], torch.dtype]],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        self.out_dir = Path(out_dir)
        shards: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{}]
        filled = 0
        for name, (shape, dtype) in tensors.items():
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and filled + nbytes > max_shard_bytes:
                shards.append({})
                filled = 0
            shards[-1][name] = (tuple(shape), dtype)
            filled += nbytes
        count = len(shards)
        self.total_bytes = 0
        self.slots: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        self.weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            path = self.out_dir / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self._create_shard(path, shard)
        self.written: set[str] = set()

    def _create_shard(self, path: Path, shard: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, (shape, dtype) in shard.items():
            end = offset + _nbytes(shape, dtype)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape)}
            header[name]["data_offsets"] = [offset, end]
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        start = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(start + offset)
        for name, (shape, dtype) in shard.items():
            self.slots[name] = (path, start + header[name]["data_offsets"][0], shape, dtype)
            self.weight_map[name] = path.name
        self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store tensor ``name`` (its planned shape and dtype) in its shard."""
        path, offset, shape, dtype = self.slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
            )
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(data.numpy().data)
        self.written.add(name)

    def close(self) -> None:
        """Write ``model.safetensors.index.json``, after checking every tensor was written."""
        unwritten = sorted(set(self.slots) - self.written)
        if unwritten:
            raise RuntimeError(f"HFWriter: tensors never written: {listing(unwritten)}")
        for name in sorted(set(self.weight_map.values())):
            with open(self.out_dir / name, "rb+") as f:
                os.fsync(f.fileno())  # on disk before the caller renames the folder into place
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        write_json(self.out_dir / INDEX_FILE, index)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel * dtype.itemsize


def write_json(path: str | os.PathLike, content: Mapping[str, Any]) -> None:
    """A JSON file the way HF writes them: indented, keys sorted, trailing newline."""
    Path(path).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

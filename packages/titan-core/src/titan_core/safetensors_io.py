"""Safetensors folders, read and written one tensor at a time.

An HF model folder holds its weights in ``model.safetensors`` or in shards named by
``model.safetensors.index.json``. A safetensors file is an 8-byte little-endian header length, a
JSON header (name -> dtype, shape, byte range) and the raw tensor bytes, back to back; both
classes here work from the header, so they never hold more than the tensor asked for.
"""

from __future__ import annotations

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


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(where the tensor bytes start, the JSON header) of a safetensors file, after checking
    that the file holds all the bytes its header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path} is truncated ({size} bytes, no header); download it again")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > size:
            raise UserError(
                f"{path} is truncated: its header needs {8 + header_len} bytes, the file has "
                f"{size}; download it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not a safetensors file (bad header)") from None
    header.pop("__metadata__", None)
    try:
        data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (KeyError, TypeError, IndexError):
        raise UserError(f"{path} is not a safetensors file (bad header)") from None
    if 8 + header_len + data_end > size:
        raise UserError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes, the "
            f"file has {size}; download it again"
        )
    return 8 + header_len, header


class HFReader:
    """The tensors of an HF folder, read one at a time (or a slice of one), never all at once.

    Opening checks every shard's header and size, so a missing or truncated file fails here,
    before any tensor is read.

    Args:
        folder: holds ``model.safetensors.index.json`` and its shards, or ``model.safetensors``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise UserError(
                f"{self.folder} holds neither {INDEX_FILE} nor {SINGLE_FILE}; only safetensors "
                "weights are supported (re-save .bin weights with safe_serialization=True)"
            )
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise UserError(f"{index}: shards not found in {self.folder}: {listing(missing)}")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.offsets: dict[str, int] = {}  # where each tensor's bytes start in its file
        for file in files:
            data_start, header = _read_header(self.folder / file)
            for name, info in header.items():
                self.files[name] = self.folder / file
                self.offsets[name] = data_start + info["data_offsets"][0]
                self.shapes[name] = tuple(info["shape"])
                if info["dtype"] not in _DTYPES:
                    raise UserError(
                        f"{self.folder / file}: {name} has unsupported dtype {info['dtype']}"
                    )
                self.dtypes[name] = _DTYPES[info["dtype"]]
        if weight_map is not None:
            absent = sorted(
                k for k, f in weight_map.items() if k not in self.files or self.files[k].name != f
            )
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
        missing = sorted(set(expected) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(expected) - set(ignorable))
        wrong = sorted(
            f"{k} {self.shapes[k]} (expected {tuple(expected[k])})"
            for k in set(expected) & set(self.shapes)
            if self.shapes[k] != tuple(expected[k])
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
                f"{self.folder}: the tensors do not match config.json ({'; '.join(problems)}); "
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

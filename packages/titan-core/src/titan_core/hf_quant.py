"""Block-quantized FP8 Hugging Face folders (the DeepSeek V3 release format), read dequantized.

Such a folder's config.json declares ``"quantization_config": {"quant_method": "fp8", "fmt":
"e4m3", "weight_block_size": [128, 128]}``. Each quantized ``X.weight`` is stored as an (R, C)
float8_e4m3fn tensor, and ``X.weight_scale_inv`` beside it holds one scale per 128x128 block,
shape (ceil(R/128), ceil(C/128)) (the blocks at the bottom and right edges may be partial): the
real weight is ``weight.float() * scale`` of its block. Other tensors (norms, embeddings, the
output head, routers) are stored in high precision, without a scale.

:class:`FP8Reader` has :class:`HFReader`'s interface and hands out each quantized weight
dequantized to float32, so every reader of HF folders (``load_pretrained``, the trainer's
``initial_load_in_hf``, titan-convert) takes FP8 checkpoints unchanged: :func:`open_hf_reader`
is the one place that picks the reader. Titan never writes FP8 (exports are bf16 or fp32).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from titan_core.errors import UserError
from titan_core.hf import CONFIG_FILE, read_hf_config
from titan_core.safetensors_io import HFReader, check_tensors, listing

QUANT_KEY = "quantization_config"
SCALE_SUFFIX = "_scale_inv"  # the scale of tensor X is X + SCALE_SUFFIX
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REFUSED = "titan imports only quant_method 'fp8', fmt 'e4m3', activation_scheme 'dynamic'"
# key -> (the value titan reads, the value when absent: transformers' own FP8 config leaves
# fmt and activation_scheme out)
_SUPPORTED = {
    "quant_method": ("fp8", None),
    "fmt": ("e4m3", "e4m3"),
    "activation_scheme": ("dynamic", "dynamic"),
}


def open_hf_reader(folder: str | os.PathLike) -> HFReader | FP8Reader:
    """The tensors of the HF folder ``folder`` as titan reads them: an :class:`FP8Reader` when
    its config.json declares a ``quantization_config``, else a plain :class:`HFReader`.

    Raises:
        UserError: config.json missing; an unsupported ``quantization_config``; a float8
            tensor without its scale (or with one of the wrong shape), or in a folder whose
            config.json declares no quantization. Checked from the headers, before any tensor
            is read.
    """
    folder = Path(folder)
    quant = read_hf_config(folder).get(QUANT_KEY)
    block = None if quant is None else block_size(quant, folder / CONFIG_FILE)
    raw = HFReader(folder)
    if block is None:
        stored = sorted(name for name, dtype in raw.dtypes.items() if dtype in _FLOAT8)
        if stored:
            raise UserError(
                f"{folder}: tensors {listing(stored)} are float8 but {CONFIG_FILE} has no "
                f"{QUANT_KEY}; add the release's {QUANT_KEY} (quant_method 'fp8', fmt 'e4m3', "
                "weight_block_size) to config.json, or use a bf16 copy of the weights"
            )
        return raw
    return FP8Reader(raw, block)


def block_size(quant: Any, path: Path) -> tuple[int, int]:
    """(rows, cols) of one scale's block, from ``quantization_config`` (in the file ``path``).

    Raises:
        UserError: a method, format or activation scheme titan does not read, or a
            ``weight_block_size`` that is not two positive integers.
    """
    where = f"{path}: {QUANT_KEY}"
    if not isinstance(quant, dict):
        raise UserError(f"{where} is {quant!r}, expected an object; {_REFUSED}")
    for key, (supported, default) in _SUPPORTED.items():
        value = quant.get(key, default)
        if value != supported:
            raise UserError(
                f"{where}.{key} is {value!r}; {_REFUSED}: dequantize the checkpoint to bf16 first"
            )
    size = quant.get("weight_block_size")
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    ):
        raise UserError(
            f"{where}.weight_block_size is {size!r}; expected two positive integers [rows, "
            "cols], e.g. [128, 128] as in the DeepSeek V3 release: fix config.json"
        )
    return size[0], size[1]


class FP8Reader:
    """An HF folder of block-quantized FP8 weights, with :class:`HFReader`'s interface: the
    scales are no tensors of its own, and each quantized weight reads as float32, dequantized
    (a slice of it reading only the scales of its blocks).

    Opening checks every float8 weight and scale from the headers alone: each weight e4m3 and
    2-D with its scale, of the shape ``block`` gives; each scale with its float8 weight.

    Args:
        raw: the folder's tensors as stored.
        block: (rows, cols) of the weights one scale covers (``weight_block_size``).
    """

    def __init__(self, raw: HFReader, block: tuple[int, int]) -> None:
        self.raw, self.block, self.folder = raw, block, raw.folder
        self.scales = {name: _scale_of(raw, name, block) for name in _float8_weights(raw)}
        hidden = set(self.scales.values())
        self.shapes = {k: shape for k, shape in raw.shapes.items() if k not in hidden}
        self.dtypes = {k: torch.float32 if k in self.scales else raw.dtypes[k] for k in self.shapes}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or only ``[rows, cols]`` of it; a quantized weight as float32."""
        if name not in self.scales:
            return self.raw.read(name, rows, cols)
        out = self.raw.read(name, rows, cols).to(torch.float32)
        if out.numel() == 0:
            return out
        block_rows, block_cols = self.block
        row_ids = range(self.shapes[name][0])[rows or slice(None)]
        col_ids = range(self.shapes[name][1])[cols or slice(None)]
        first_row, first_col = row_ids[0] // block_rows, col_ids[0] // block_cols
        scale = self.raw.read(
            self.scales[name],
            rows=slice(first_row, row_ids[-1] // block_rows + 1),
            cols=slice(first_col, col_ids[-1] // block_cols + 1),
        ).to(torch.float32)
        # (row blocks, kept cols): each kept column's scale, in every block of rows read
        of_col = torch.arange(col_ids.start, col_ids.stop, col_ids.step) // block_cols
        scale = scale[:, of_col - first_col]
        # NOTE: the kept rows of one block are consecutive in ``out`` (rows ascend), so each
        # block is scaled in place through a view: the scales are never expanded to the
        # weight's shape, which would double the memory of a streamed read.
        of_row = torch.arange(row_ids.start, row_ids.stop, row_ids.step) // block_rows
        counts = torch.bincount(of_row - first_row, minlength=scale.shape[0]).tolist()
        for rows_of_block, block_scale in zip(out.split(counts), scale, strict=True):
            rows_of_block.mul_(block_scale)
        return out

    def validate(
        self, expected: Mapping[str, Sequence[int]], ignorable: Collection[str] = ()
    ) -> None:
        """As :meth:`HFReader.validate`; a quantized weight counts with its stored shape."""
        check_tensors(self.folder, self.shapes, expected, ignorable)


def _float8_weights(raw: HFReader) -> list[str]:
    """The float8 tensors of ``raw``, after checking every scale has its float8 weight."""
    for name in raw.shapes:
        weight = name.removesuffix(SCALE_SUFFIX)
        if name.endswith(SCALE_SUFFIX) and raw.dtypes.get(weight) not in _FLOAT8:
            found = f"stored as {raw.dtypes[weight]}" if weight in raw.dtypes else "missing"
            raise UserError(
                f"{raw.folder}: scale '{name}' has no float8 weight '{weight}' (it is {found}); "
                "the folder mixes files of two checkpoints: download it again"
            )
    return [name for name, dtype in raw.dtypes.items() if dtype in _FLOAT8]


def _scale_of(raw: HFReader, name: str, block: tuple[int, int]) -> str:
    """The name of float8 weight ``name``'s scale, after checking both from their headers."""
    where = f"{raw.folder}: tensor '{name}'"
    dtype, shape = raw.dtypes[name], raw.shapes[name]
    if dtype != torch.float8_e4m3fn:
        raise UserError(
            f"{where} is {dtype} but {QUANT_KEY}.fmt is 'e4m3'; fix fmt in config.json or "
            "dequantize the checkpoint to bf16 first"
        )
    if len(shape) != 2:
        raise UserError(
            f"{where} is float8 of shape {shape}; block quantization covers 2-D (rows, cols) "
            "weights only: dequantize the checkpoint to bf16 first"
        )
    scale = name + SCALE_SUFFIX
    if scale not in raw.shapes:
        raise UserError(
            f"{where} is float8 but its scale '{scale}' is missing; every quantized weight "
            "needs one: download the checkpoint again"
        )
    expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))  # partial edge blocks
    if raw.shapes[scale] != expected:
        raise UserError(
            f"{raw.folder}: scale '{scale}' has shape {raw.shapes[scale]}, expected {expected} "
            f"(weight {shape} in blocks of {list(block)}); fix {QUANT_KEY}.weight_block_size "
            "in config.json or download the checkpoint again"
        )
    if raw.dtypes[scale] not in _SCALE_DTYPES:
        raise UserError(
            f"{raw.folder}: scale '{scale}' is {raw.dtypes[scale]}, expected float32 (or bf16, "
            "fp16); download the checkpoint again"
        )
    return scale

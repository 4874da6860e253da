"""Hugging Face interop, model-agnostic: state-dict adapters and the drivers that use them.

A model package describes its HF format with a :class:`StateDictAdapter` subclass (key map with
``{}`` layer and ``{expert}`` expert templates, see :mod:`titan_core.hf_keys`; tensor transforms;
config.json mapping) and sets it as its TrainSpec's ``state_dict_adapter``. Everything here is
generic: titan-convert, ``load_pretrained`` and the trainer drive any family's adapter the same
way, one titan tensor at a time (an MoE weight: one layer's experts, stacked from their HF
tensors as they are read, split into them as it is written). The safetensors files themselves
are read and written by :mod:`titan_core.safetensors_io` (block-quantized FP8 folders are read
dequantized through :mod:`titan_core.hf_quant`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from titan_core.checkpoint_files import model_args_of, read_meta, single_process_dcp
from titan_core.checkpoint_safety import SafeFileSystemReader, load_checkpoint
from titan_core.errors import UserError
from titan_core.hf_export import CONFIG_FILE, GENERATION_CONFIG_FILE, write_export_files
from titan_core.hf_keys import DECODER_KEY_MAP, DECODER_ROPE_ROWS, KeyRule, compile_key_map
from titan_core.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    HFReader,
    HFWriter,
    listing,
    write_json,
)
from titan_core.train_spec import TrainSpec, available_models, get_train_spec

if TYPE_CHECKING:  # hf_quant imports this module
    from titan_core.hf_quant import FP8Reader

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "GENERATION_CONFIG_FILE",
    "INDEX_FILE",
    "SINGLE_FILE",
    "CheckpointExport",
    "HFReader",
    "HFWriter",
    "StateDictAdapter",
    "adapter_of",
    "convert_dcp_to_hf",
    "flavor_name",
    "read_hf_config",
    "read_titan_tensor",
    "rope_rows_from_hf",
    "rope_rows_to_hf",
    "spec_for_hf_folder",
    "write_json",
]

logger = logging.getLogger("titan")


# ---- RoPE layout ----------------------------------------------------------------------------


def rope_rows_from_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to titan's pairs.

    Within each head HF rotates dimension ``j`` with ``j + head_dim/2``; titan's RoPE rotates
    ``2j`` with ``2j + 1``. Row ``half * head_dim/2 + j`` of an HF head becomes row
    ``2j + half``. Works on any number of whole heads (rows a multiple of ``head_dim``).
    """
    rows, *rest = weight.shape
    halves = weight.reshape(rows // head_dim, 2, head_dim // 2, *rest)  # (H, half, j, ...)
    return halves.transpose(1, 2).reshape(rows, *rest)  # (H, j, half, ...) -> rows


def rope_rows_to_hf(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`rope_rows_from_hf`: titan's pairs back to HF's rotate-half rows."""
    rows, *rest = weight.shape
    pairs = weight.reshape(rows // head_dim, head_dim // 2, 2, *rest)  # (H, j, half, ...)
    return pairs.transpose(1, 2).reshape(rows, *rest)  # (H, half, j, ...) -> rows


# ---- the adapter ----------------------------------------------------------------------------


class StateDictAdapter:
    """How one model family maps to and from its Hugging Face format; subclass per family.

    A subclass sets the class attributes and implements :meth:`args_from_hf_config` and
    :meth:`hf_config`; it overrides :meth:`from_hf`/:meth:`to_hf` (and :meth:`row_block`) for
    tensors whose layout differs. Names are mapped through ``key_map`` (see
    :mod:`titan_core.hf_keys`: ``{}`` stands for a layer index, ``{expert}`` on the HF side for
    an expert index, the titan tensor then stacking the experts' HF tensors along dimension 0;
    ``None`` marks titan-only state). A titan parameter tied to an earlier one (the output
    projection sharing the embedding table) has no HF tensor of its own: it reads its twin's and
    writes nothing.

    Attributes:
        model_types: the config.json ``model_type`` values this family claims.
        architecture: the config.json ``architectures`` entry, e.g. ``LlamaForCausalLM``.
        model_cls: the family's model class; ``model_cls(args)`` is built on the meta device to
            learn parameter names, shapes and ties.
        key_map: titan name template -> HF name template (or None); default: the decoder map
            every family shares (:data:`titan_core.hf_keys.DECODER_KEY_MAP`).
        rope_rows: name suffixes of the tensors whose rows (per head of ``args.head_dim``) are
            in RoPE order: HF's rotate-half halves, titan's interleaved pairs (q/k projections,
            and per-head q/k norm scales); they are reordered both ways. Default: ``wq``, ``wk``.
    """

    model_types: tuple[str, ...] = ()
    architecture: str = ""
    model_cls: type[nn.Module]
    key_map: ClassVar[Mapping[str, str | None]] = DECODER_KEY_MAP
    rope_rows: ClassVar[tuple[str, ...]] = DECODER_ROPE_ROWS

    def __init__(self) -> None:
        self._rules = compile_key_map(self.key_map, type(self).__name__)
        self._layouts: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, str]]] = {}

    # ---- config.json -----------------------------------------------------------------

    def args_from_hf_config(self, config: dict[str, Any]) -> Any:
        """The model args that config.json describes, exactly; UserError for what we lack."""
        raise NotImplementedError

    def args_from_hf_folder(self, folder: str | os.PathLike) -> Any:
        """:meth:`args_from_hf_config` of an HF folder's config.json; errors name the file."""
        config = read_hf_config(folder)
        try:
            return self.args_from_hf_config(config)
        except UserError as e:
            message = str(e).removeprefix(f"{CONFIG_FILE}: ")
            raise UserError(f"{Path(folder) / CONFIG_FILE}: {message}") from None

    def hf_config(self, args: Any, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The config.json content for ``args``, with weights stored in ``dtype``.

        Raises:
            UserError: ``args`` use a feature the HF format cannot express (names the field).
        """
        raise NotImplementedError

    def decoder_hf_config(self, args: Any, dtype: torch.dtype) -> dict[str, Any]:
        """The config.json keys every pre-norm decoder family writes the same way (args with
        ``dim``, ``hidden_dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``,
        ``max_seq_len``, ``norm_eps``, ``rope_theta``, ``tie_word_embeddings``, ``vocab_size``);
        a family's :meth:`hf_config` adds its own."""
        dtype_name = str(dtype).removeprefix("torch.")
        return {
            "architectures": [self.architecture],
            "model_type": self.model_types[0],
            "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "max_position_embeddings": args.max_seq_len,
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "tie_word_embeddings": args.tie_word_embeddings,
            "vocab_size": args.vocab_size,
            "torch_dtype": dtype_name,  # transformers 4.x
            "dtype": dtype_name,  # transformers 5.x
        }

    def hf_generation_config(self, args: Any) -> dict[str, Any]:
        """The generation_config.json content (the args hold no token ids: empty by default)."""
        return {}

    # ---- names and shapes ------------------------------------------------------------

    def titan_layout(self, args: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
        """(titan name -> shape, tied name -> the name it shares its tensor with), cached."""
        key = repr(args)  # model args may be unhashable; a dataclass repr names every field
        if key not in self._layouts:
            with torch.device("meta"):
                model = self.model_cls(args)
            shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
            first: dict[int, str] = {}
            ties = {}
            for name, param in model.named_parameters(remove_duplicate=False):
                ties_to = first.setdefault(id(param), name)
                if ties_to != name:
                    ties[name] = ties_to
            self._layouts[key] = (shapes, ties)
        return self._layouts[key]

    def titan_shapes(self, args: Any) -> dict[str, tuple[int, ...]]:
        """Every titan state-dict name (tied ones included) and its shape."""
        return self.titan_layout(args)[0]

    def _rule(self, titan_name: str) -> tuple[KeyRule, re.Match[str]]:
        for rule in self._rules:
            match = rule.pattern.match(titan_name)
            if match:
                return rule, match
        raise KeyError(f"{type(self).__name__}.key_map has no entry for '{titan_name}'")

    def _own_hf_names(self, args: Any, titan_name: str) -> list[str]:
        rule, match = self._rule(titan_name)
        n_experts = self.titan_shapes(args)[titan_name][0] if rule.stacked else 0
        return rule.hf_names(match, n_experts)

    def hf_names(self, args: Any, titan_name: str) -> list[str]:
        """The HF keys the titan tensor ``titan_name`` is read from (a tied one: its twin's):
        one; one per expert, in expert order, for a stacked entry; none for titan-only state."""
        return self._own_hf_names(args, self.titan_layout(args)[1].get(titan_name, titan_name))

    def is_stacked(self, titan_name: str) -> bool:
        """Whether ``titan_name`` stacks one HF tensor per expert along its dimension 0."""
        return self._rule(titan_name)[0].stacked

    def is_titan_only(self, titan_name: str) -> bool:
        """Whether ``titan_name`` has no HF tensor (key map entry None): zeros when read from
        HF, not written to HF."""
        return self._rule(titan_name)[0].hf is None

    def titan_only(self, args: Any) -> list[str]:
        """Every titan name with no HF tensor (see :meth:`is_titan_only`)."""
        return [n for n in self.titan_shapes(args) if self.is_titan_only(n)]

    def expected_hf(self, args: Any) -> dict[str, tuple[int, ...]]:
        """Every HF key an HF folder of ``args`` holds, and its shape."""
        expected = {}
        for name, shape in self.titan_shapes(args).items():
            for hf_name, tensor in self.to_hf(args, name, torch.empty(shape, device="meta")):
                expected[hf_name] = tuple(tensor.shape)
        return expected

    def redundant_hf(self, args: Any) -> set[str]:
        """HF names of tied tensors that a folder may store anyway (Qwen3-0.6B's
        ``lm_head.weight``): accepted when present, never read, never written."""
        return {hf for tied in self.titan_layout(args)[1] for hf in self._own_hf_names(args, tied)}

    def skipped_hf(self, args: Any, present: Collection[str]) -> set[str]:
        """HF tensors of a folder (``present``) that titan's model has no place for and reads
        past, e.g. DeepSeek V3's multi-token-prediction layer; a family overrides this and logs
        what it skips. None by default: an unknown tensor is an error."""
        return set()

    def ignorable_hf(self, args: Any, present: Collection[str]) -> set[str]:
        """What a folder may hold beyond :meth:`expected_hf`: tied duplicates and skipped
        tensors."""
        return self.redundant_hf(args) | self.skipped_hf(args, present)

    # ---- tensors ---------------------------------------------------------------------

    def row_block(self, args: Any, titan_name: str) -> int:
        """Rows come in blocks of this many: :meth:`from_hf` is valid on whole blocks only.
        (A stacked tensor's rows are experts: any range of them converts on its own.)"""
        return args.head_dim if titan_name.endswith(self.rope_rows) else 1

    def from_hf(self, args: Any, titan_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The HF tensor of ``titan_name`` (or whole row blocks of it) in titan's layout. For a
        stacked entry ``tensor`` is the experts' HF tensors (a range of them) stacked on a new
        dimension 0."""
        if titan_name.endswith(self.rope_rows):
            return rope_rows_from_hf(tensor, args.head_dim)
        return tensor

    def to_hf(
        self, args: Any, titan_name: str, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """The HF (name, tensor) pairs of one titan tensor: one; one per expert (views of its
        slices) for a stacked entry; none for a tied or titan-only one."""
        if titan_name in self.titan_layout(args)[1]:
            return []
        if titan_name.endswith(self.rope_rows):
            tensor = rope_rows_to_hf(tensor, args.head_dim)
        names = self.hf_names(args, titan_name)
        if self.is_stacked(titan_name):
            return list(zip(names, tensor.unbind(0), strict=True))
        return [(name, tensor) for name in names]


NOT_ARCHITECTURE = ("max_seq_len", "aux_loss_coef", "load_balance_coeff", "use_grouped_mm")
"""Fields of model args (and of args nested in them, e.g. ``MoEArgs``) that set how a model is
trained or run, not which weights it has: a folder is a flavor whatever they hold."""


def _with_training_fields(flavor: Any, args: Any) -> Any:
    """``flavor`` with the :data:`NOT_ARCHITECTURE` fields of ``args``, at every nesting level."""
    if not dataclasses.is_dataclass(flavor) or type(flavor) is not type(args):
        return flavor
    changes = {}
    for field in dataclasses.fields(flavor):
        mine, theirs = getattr(flavor, field.name), getattr(args, field.name)
        if field.name in NOT_ARCHITECTURE:
            changes[field.name] = theirs
        elif dataclasses.is_dataclass(mine):
            changes[field.name] = _with_training_fields(mine, theirs)
    return dataclasses.replace(flavor, **changes)


def flavor_name(spec: TrainSpec, args: Any) -> str:
    """The flavor whose args equal ``args`` in every architecture field (the RoPE table length
    and MoE training settings aside, see :data:`NOT_ARCHITECTURE`), else ``custom``."""
    for name, flavor in spec.flavors.items():
        if _with_training_fields(flavor, args) == args:
            return name
    return "custom"


def adapter_of(spec: TrainSpec) -> StateDictAdapter:
    """The spec's HF adapter; UserError if the family has none."""
    if spec.state_dict_adapter is None:
        raise UserError(
            f"model '{spec.name}' has no Hugging Face adapter (its TrainSpec's "
            "state_dict_adapter is None); it cannot be converted to or from HF"
        )
    return spec.state_dict_adapter


# ---- config.json and the family --------------------------------------------------------------


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF folder (UserError if missing or not a JSON object)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found; pass a Hugging Face model folder (config.json and *.safetensors)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def spec_for_hf_folder(folder: str | os.PathLike, model_name: str | None = None) -> TrainSpec:
    """The installed TrainSpec for an HF folder: ``model_name`` if given, else the one whose
    adapter claims config.json's ``model_type``.

    Raises:
        UserError: no config.json, or no (or more than one) installed family claims its
            model_type; the message lists the model types that are supported.
    """
    config = read_hf_config(folder)
    if model_name is not None:
        spec = get_train_spec(model_name)
        adapter_of(spec)
        return spec
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UserError(
            f"{Path(folder) / CONFIG_FILE}: 'model_type' is {model_type!r}, expected the model "
            "type's name (e.g. 'llama'); fix config.json or pass --model.name"
        )
    claims: dict[str, list[str]] = {}
    specs = {}
    for name in available_models():
        try:
            spec = get_train_spec(name)
        except UserError:
            continue  # a broken plugin must not hide the working ones
        for claimed in getattr(spec.state_dict_adapter, "model_types", ()):
            claims.setdefault(claimed, []).append(name)
            specs[name] = spec
    owners = claims.get(model_type, [])
    if len(owners) == 1:
        return specs[owners[0]]
    known = ", ".join(f"{t} ({'/'.join(n)})" for t, n in sorted(claims.items())) or "none"
    path = Path(folder) / CONFIG_FILE
    if owners:
        raise UserError(
            f"{path}: model_type '{model_type}' is claimed by several installed models "
            f"({', '.join(owners)}); pick one with --model.name"
        )
    raise UserError(
        f"{path}: model_type '{model_type}' is not supported by any installed model package "
        f"(supported: {known}); install the package for it or pass --model.name"
    )


# ---- reading titan tensors from HF files ----------------------------------------------------


def read_titan_tensor(
    reader: HFReader | FP8Reader,
    adapter: StateDictAdapter,
    args: Any,
    titan_name: str,
    rows: slice | None = None,
    cols: slice | None = None,
) -> torch.Tensor:
    """Titan tensor ``titan_name``, or its ``[rows, cols]``, read from an HF folder.

    Only the whole row blocks covering ``rows`` are read (and of them only ``cols``), so a
    sharded loader (FSDP rows, tensor-parallel rows or columns) reads just its share. A stacked
    tensor's rows are experts: only the experts in ``rows`` are read, one HF tensor at a time
    into the result, so a reader holds at most one titan tensor (one layer's experts of one
    weight). Titan-only state (no HF tensor) reads as float32 zeros.
    """
    if adapter.is_titan_only(titan_name):
        zeros = torch.zeros(adapter.titan_shapes(args)[titan_name])
        return zeros[rows or slice(None)] if cols is None else zeros[rows or slice(None), cols]
    names = adapter.hf_names(args, titan_name)
    if adapter.is_stacked(titan_name):
        return adapter.from_hf(args, titan_name, _read_stack(reader, names, rows, cols))
    (hf_name,) = names
    if rows is None:
        return adapter.from_hf(args, titan_name, reader.read(hf_name, cols=cols))
    block = adapter.row_block(args, titan_name)
    start, stop, step = rows.indices(reader.shapes[hf_name][0])
    if step != 1:
        raise ValueError(f"read_titan_tensor: rows must be contiguous, got {rows}")
    first, last = start // block * block, -(-stop // block) * block
    tensor = reader.read(hf_name, rows=slice(first, last), cols=cols)
    return adapter.from_hf(args, titan_name, tensor)[start - first : stop - first]


def _read_stack(
    reader: HFReader | FP8Reader, names: list[str], experts: slice | None, cols: slice | None
) -> torch.Tensor:
    """The HF tensors ``names[experts]`` stacked on a new dimension 0, each read on its own
    into its slot; ``cols`` (the stack's dimension 1) are rows of each HF tensor."""
    if experts is not None and experts.step not in (None, 1):
        raise ValueError(f"read_titan_tensor: rows must be contiguous, got {experts}")
    chosen = names[experts or slice(None)]
    shape = reader.shapes[names[0]]
    kept = len(range(shape[0])[cols]) if cols is not None else shape[0]
    out = torch.empty((len(chosen), kept, *shape[1:]), dtype=reader.dtypes[names[0]])
    for slot, name in zip(out, chosen, strict=True):
        slot.copy_(reader.read(name, rows=cols))
    return out


# ---- a titan checkpoint as an HF folder ------------------------------------------------------


class CheckpointExport:
    """A titan checkpoint's HF folder: checked on construction, written by :meth:`write`.

    Args:
        folder: a checkpoint folder (``step-N``, holding ``titan.json``).
        export_dtype: dtype of the safetensors weights.

    Raises:
        UserError: the checkpoint's model has no adapter, or its tensors do not match the model
            its ``titan.json`` describes (the differences are listed).
    """

    def __init__(self, folder: Path, export_dtype: torch.dtype = torch.float32) -> None:

        self.folder, self.dtype = Path(folder), export_dtype
        self.meta = read_meta(self.folder)
        spec = get_train_spec(self.meta["model"])
        self.adapter = adapter_of(spec)
        self.args = model_args_of(spec, self.meta, str(folder))
        self.reader = SafeFileSystemReader(str(self.folder))
        try:
            stored = self.reader.read_metadata().state_dict_metadata
        except UserError:
            raise  # code in the checkpoint: refused by the reader, never run
        except Exception as e:
            raise UserError(f"{folder}: the DCP metadata cannot be read ({e})") from None
        self.stored = {  # a non-tensor entry is not loaded: it shows as missing
            k.removeprefix("model."): m
            for k, m in stored.items()
            if k.startswith("model.") and hasattr(m, "size")
        }
        self.shapes = self.adapter.titan_shapes(self.args)
        self._check()
        self.adapter.hf_config(self.args, export_dtype)  # what HF cannot express: refused now
        self.layout = {  # HF name -> (shape, dtype)
            hf_name: (tuple(shape), export_dtype)
            for hf_name, shape in self.adapter.expected_hf(self.args).items()
        }
        self.total_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in self.layout.values())

    def _check(self) -> None:
        stored = {k: tuple(m.size) for k, m in self.stored.items()}
        diffs = sorted(
            f"{k}: checkpoint {stored.get(k, 'missing')}, model {self.shapes.get(k, 'missing')}"
            for k in set(stored) | set(self.shapes)
            if stored.get(k) != self.shapes.get(k)
        )
        if diffs:
            raise UserError(
                f"{self.folder}: the weights do not match its titan.json model_args "
                f"({listing(diffs)})"
            )

    def write(
        self,
        out_dir: Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write config files, tokenizer files and the weights into the existing ``out_dir``,
        one tensor in memory at a time; ``progress(nbytes)`` after each tensor."""

        writer = HFWriter(out_dir, self.layout, max_shard_bytes)
        tied = self.adapter.titan_layout(self.args)[1]
        titan_only = set(self.adapter.titan_only(self.args))
        for name, shape in self.shapes.items():
            if name in tied:
                continue  # shares its twin's tensor: HF stores it once
            tensor = torch.empty(shape, dtype=self.stored[name].properties.dtype)
            with single_process_dcp():
                load_checkpoint({"model": {name: tensor}}, self.folder, True, self.reader)
            if name in titan_only and tensor.any():
                logger.warning(
                    "%s: '%s' is not zero, but the Hugging Face format has no tensor for it: "
                    "the HF folder is written without it (an MoE expert bias: the HF model "
                    "routes without the bias, so its outputs differ from titan's)",
                    self.folder, name,
                )  # fmt: skip
            for hf_name, hf_tensor in self.adapter.to_hf(self.args, name, tensor):
                writer.write(hf_name, hf_tensor.to(self.dtype))
                if progress is not None:
                    progress(hf_tensor.numel() * self.dtype.itemsize)
            del tensor
        writer.close()
        self._write_configs(Path(out_dir))

    def _write_configs(self, out_dir: Path) -> None:
        """config.json, generation_config.json and the tokenizer files next to the weights."""
        config = self.adapter.hf_config(self.args, self.dtype)
        generation = self.adapter.hf_generation_config(self.args)
        write_export_files(out_dir, self.folder, self.meta, config, generation)


def convert_dcp_to_hf(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    export_dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the titan checkpoint ``folder`` (a ``step-N``) as an HF folder into ``out_dir``
    (created if needed), tensor by tensor. titan-convert adds the safe output folder and
    progress; the trainer's ``checkpoint.last_save_in_hf`` calls this directly."""
    export = CheckpointExport(Path(folder), export_dtype)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    export.write(Path(out_dir), max_shard_bytes)

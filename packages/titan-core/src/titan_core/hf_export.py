"""The files an HF export writes besides the weights, so the folder generates as titan trained it.

transformers reads the token ids ``generate()`` starts and stops with from config.json and
generation_config.json, and falls back to its own defaults (Llama: BOS 1, EOS 2) when they are
missing. An export therefore writes, next to the weights:

- config.json's ``bos_token_id``/``eos_token_id`` (and ``pad_token_id`` if the tokenizer has
  one): those of the tokenizer the model was trained with, recorded in ``titan.json``
  (``tokenizer_ids``); an HF source's values are kept where they agree with it (Llama 3.1's
  list of EOS ids holds the tokenizer's);
- generation_config.json: the HF source's (converted or trained from) with the same ids;
- the tokenizer's files, from the checkpoint's own ``tokenizer/`` copy (else the tokenizer
  ``titan.json`` names), with a ``tokenizer_config.json`` that names BOS and EOS, the tokenizer
  class when the source names none, and ``model_max_length``.

The checkpointer calls :func:`save_tokenizer_files` and :func:`token_ids` when it writes a
checkpoint; :class:`titan_core.hf.CheckpointExport` calls :func:`write_export_files`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from titan_core.checkpoint_files import TOKEN_IDS, TOKENIZER_DIR
from titan_core.data.embedded import embedded_assets_dir
from titan_core.data.tokenizer import EMBEDDED, load_tokenizer
from titan_core.errors import UserError
from titan_core.safetensors_io import write_json

logger = logging.getLogger("titan")

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (
    TOKENIZER_JSON,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What tokenizer.json alone describes; transformers would otherwise pick a class from config.json's
# model_type (e.g. LlamaTokenizer), which may rebuild the tokenizer its own way.
FAST_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


# ---- at checkpoint time ---------------------------------------------------------------------


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The ``titan.json`` record of a run's tokenizer: its ids as config.json spells them, and
    its vocabulary size."""
    if tokenizer is None:
        return {}
    record = {"eos_token_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size}
    if getattr(tokenizer, "has_bos", True):  # not Qwen's EOS standing in for a BOS
        record["bos_token_id"] = tokenizer.bos_id
    if getattr(tokenizer, "pad_id", None) is not None:
        record["pad_token_id"] = tokenizer.pad_id
    return record


def tokenizer_source(tokenizer: Any, hf_assets_path: str) -> Path | None:
    """The folder a run's tokenizer files are in: the tokenizer's own, else the one
    ``model.hf_assets_path`` names (the embedded one for ``""``)."""
    folder = getattr(tokenizer, "folder", None)
    if folder is not None:
        return Path(folder)
    if hf_assets_path in ("", EMBEDDED):
        return embedded_assets_dir()
    path = Path(hf_assets_path).expanduser()
    return path if path.is_dir() else None


def save_tokenizer_files(source: Path | None, dest: Path) -> None:
    """Copy the tokenizer files (and generation_config.json) ``source`` holds into ``dest``."""
    if source is None or not (source / TOKENIZER_JSON).is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object, or None when it is missing or is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ---- at export time -------------------------------------------------------------------------


def tokenizer_folder(step: Path, meta: dict[str, Any]) -> Path | None:
    """Where a checkpoint's tokenizer files are: its ``tokenizer/`` copy, else the folder its
    ``titan.json`` names (the embedded one for ``embedded``), else None."""
    own = step / TOKENIZER_DIR
    if (own / TOKENIZER_JSON).is_file():
        return own
    name = meta.get("tokenizer")
    if name == EMBEDDED:
        return embedded_assets_dir()
    return Path(name) if isinstance(name, str) and name and Path(name).is_dir() else None


def write_export_files(
    out_dir: Path, step: Path, meta: dict[str, Any], config: dict[str, Any], generation: dict
) -> None:
    """config.json, generation_config.json and the tokenizer files of the checkpoint ``step``.

    Args:
        out_dir: the HF folder being written.
        step: the ``step-N`` checkpoint folder.
        meta: its ``titan.json``.
        config: config.json as the model's args give it (token ids are added here).
        generation: the family's default generation_config.json (used when no HF source's).
    """
    source = tokenizer_folder(step, meta)
    ids = _export_ids(meta, source)
    write_json(out_dir / CONFIG_FILE, {**config, **ids})
    write_json(out_dir / GENERATION_CONFIG_FILE, _generation_config(meta, generation, ids, step))
    if source is None:
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    if (source / TOKENIZER_JSON).is_file():
        positions = config.get("max_position_embeddings")
        write_json(out_dir / TOKENIZER_CONFIG, _tokenizer_config(source, ids, positions))


def _recorded_ids(meta: dict[str, Any], source: Path | None) -> dict[str, int]:
    """The token ids of the tokenizer the model was trained with: recorded in ``titan.json``,
    else (a checkpoint from before they were recorded) read from its tokenizer files."""
    recorded = meta.get(TOKEN_IDS)
    if recorded:
        return {k: v for k, v in recorded.items() if k in TOKEN_ID_KEYS}
    if source is None or not (source / TOKENIZER_JSON).is_file():
        return {}
    try:
        return {
            k: v for k, v in token_ids(load_tokenizer(str(source))).items() if k != "vocab_size"
        }
    except UserError:
        return {}  # not a tokenizer titan can read: its files are still copied verbatim


def _export_ids(meta: dict[str, Any], source: Path | None) -> dict[str, Any]:
    """config.json's token ids: the HF source's where they agree with the trained tokenizer's
    (or it recorded none), else the tokenizer's."""
    mine = _recorded_ids(meta, source)
    theirs = meta.get("hf_config") or {}
    ids = {}
    for key in TOKEN_ID_KEYS:
        own, source_value = mine.get(key), theirs.get(key)
        if source_value is not None and (own is None or agrees(source_value, own)):
            ids[key] = source_value
        elif own is not None:
            ids[key] = own
    return ids


def agrees(value: Any, token_id: Any) -> bool:
    """Whether a token-id entry (an id, or a list of ids as Llama 3.1's EOS) holds every id of
    ``token_id`` (an id or a list of them)."""
    as_set = lambda v: set(v) if isinstance(v, list) else {v}  # noqa: E731
    return as_set(token_id) <= as_set(value)


def _generation_config(
    meta: dict[str, Any], default: dict, ids: dict[str, Any], step: Path
) -> dict[str, Any]:
    """The HF source's generation_config.json (else the family's default), its token ids made
    those of config.json where they disagree."""
    generation = dict(meta.get("hf_generation_config") or default)
    for key, value in ids.items():
        if key in generation and generation[key] is not None and not agrees(generation[key], value):
            logger.warning(
                "%s: the source's generation_config.json has %s %s, but the model was trained "
                "with a tokenizer whose id is %s; exported with %s",
                step, key, generation[key], value, value,
            )  # fmt: skip
            generation[key] = value
        elif generation.get(key) is None:
            generation[key] = value
    return generation


def _tokenizer_config(source: Path, ids: dict[str, Any], positions: int | None) -> dict:
    """The source's tokenizer_config.json, naming BOS/EOS (and PAD), the tokenizer class when
    it names none, and the model's positions as ``model_max_length``."""
    config = read_json_object(source / TOKENIZER_CONFIG) or {}
    config.setdefault("tokenizer_class", FAST_TOKENIZER_CLASS)
    names = _token_names(source / TOKENIZER_JSON, ids)
    for key, name in names.items():
        config.setdefault(key, name)
    if positions is not None:
        config["model_max_length"] = positions
    return config


def _token_names(path: Path, ids: dict[str, Any]) -> dict[str, str]:
    """``{"bos_token": "<|bos|>", ...}`` for the (first) ids of ``ids`` in ``tokenizer.json``."""
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception:  # the Rust side raises bare Exceptions; a foreign file is copied as is
        return {}
    names = {}
    for key, value in ids.items():
        first = value[0] if isinstance(value, list) and value else value
        name = tok.id_to_token(first) if isinstance(first, int) else None
        if name is not None:
            names[key.removesuffix("_id")] = name
    return names

"""The offline default corpus and tokenizer.

The quick start and the tests must train with no network and no downloaded data, so titan builds a
small real-text corpus from something every Python install already has: the docstrings of the
standard library's own ``.py`` files (parsed with :mod:`ast`, never imported). A byte-level BPE
tokenizer with :data:`EMBEDDED_VOCAB_SIZE` entries is trained on it. Both are built once per Python
version and cached under ``$TITAN_CACHE_DIR`` (default ``~/.cache/titan``); no corpus text lives in
the repository.

NOTE: the corpus depends on the exact standard library, so two machines with different Python patch
releases can get slightly different corpora and tokenizers. Checkpoints trained on the embedded data
are meant for smoke tests, not for moving between machines.
"""

from __future__ import annotations

import ast
import fcntl
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tokenizers

EMBEDDED_VOCAB_SIZE = 2048
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"

# Docstrings shorter than this are mostly one-liners ("Return self.") that teach the model little.
_MIN_DOC_CHARS = 80
# Test suites and vendored or GUI code: repetitive, noisy, or not part of every install.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "site-packages",
        "dist-packages",
        "__pycache__",
    }
)
_FILES = ("corpus.jsonl", "tokenizer_config.json", "tokenizer.json")
# Part of the cache folder's name: bumped whenever the files built change, so older caches are
# rebuilt rather than used. v2: tokenizer.json prepends <|bos|> when asked for special tokens.
_ASSETS_VERSION = 2

logger = logging.getLogger("titan")


def cache_root() -> Path:
    """The titan cache folder: ``$TITAN_CACHE_DIR`` if set, else ``~/.cache/titan``."""
    env = os.environ.get("TITAN_CACHE_DIR", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "titan"


def embedded_assets_dir() -> Path:
    """Return the folder holding the embedded corpus and tokenizer, building them if needed.

    The folder holds ``corpus.jsonl`` (one ``{"text": ...}`` per line), ``tokenizer.json`` and
    ``tokenizer_config.json``. The first call builds them (a few seconds); later calls, including
    from other processes, only check that the files exist.
    """
    python = f"py{sys.version_info.major}.{sys.version_info.minor}"
    folder = cache_root() / f"embedded-v{_ASSETS_VERSION}-{python}"
    ensure_built(folder, _build)
    return folder


def ensure_built(folder: Path, build: Callable[[Path], None]) -> None:
    """Run ``build(folder)`` once across processes unless every asset file already exists.

    Args:
        folder: where the assets live; created if missing.
        build: writes the assets into ``folder``; each file must be written atomically.
    """
    if _complete(folder):
        return
    folder.mkdir(parents=True, exist_ok=True)
    # NOTE: torchrun starts every rank at once; the exclusive lock makes one of them build while
    # the others wait, then find the files and return without building again.
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(folder):
                build(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _FILES)


def _build(folder: Path) -> None:
    logger.info("building the embedded corpus and tokenizer in %s (once)", folder)
    docs = list(stdlib_docstrings())
    lines = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    _write_atomic(folder / "corpus.jsonl", lines)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # what tokenizer.json alone describes
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,  # decode gives back the text that was encoded
        "model_max_length": 1 << 20,
    }
    _write_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    # tokenizer.json last: its presence (with the others) marks the folder complete.
    _write_atomic(folder / "tokenizer.json", _train_tokenizer(docs).to_str())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def stdlib_docstrings(stdlib: Path | None = None) -> Iterator[str]:
    """Yield each module, class and function docstring of the standard library, in a fixed order.

    Exact repeats (inherited or copied docstrings) are yielded once.

    Args:
        stdlib: the standard library folder; defaults to ``sysconfig.get_paths()["stdlib"]``.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    seen: set[str] = set()
    for path in files:
        for doc in _file_docstrings(path):
            if len(doc) >= _MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                yield doc


def _file_docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        # A few stdlib files are templates or use syntax of another version; skip them.
        return
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _train_tokenizer(docs: list[str]) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=EMBEDDED_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    if tok.get_vocab_size(with_added_tokens=True) != EMBEDDED_VOCAB_SIZE:
        raise RuntimeError(
            f"embedded tokenizer: trained {tok.get_vocab_size()} tokens, expected "
            f"{EMBEDDED_VOCAB_SIZE}; the standard library corpus is too small to fill it"
        )
    # NOTE: training encodes without special tokens (the loader adds BOS and EOS itself); a
    # prompt encoded with them (transformers' tokenizer(text)) starts with BOS, as every
    # training document does. The post-processor changes no id of the corpus.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, tok.token_to_id(BOS_TOKEN))],
    )
    return tok

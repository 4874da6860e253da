"""Document sources: global document number ``i`` to text, for ``i = 0, 1, 2, ...`` forever.

Two kinds:

* Map-style (the embedded corpus, local files): random access to ``N`` documents. Index ``i`` is
  position ``i % N`` of epoch ``i // N``, and each epoch is its own permutation seeded with
  ``seed + epoch``, so every epoch is shuffled and the order is a function of the seed alone.
* Streaming (hub datasets): one forward iterator in the dataset's own order, with no shuffle.
  ``get`` must be called with indices that mostly increase; documents passed on the way that a
  caller will still need (the ``owned`` predicate) wait in a lookahead cache, the rest are dropped.
  At the end of the stream it restarts (the next epoch, in the same order).

``datasets`` is imported only when a local or hub dataset is opened: it is slow to import, and the
embedded default does not need it.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from titan_core.data.embedded import embedded_assets_dir
from titan_core.errors import UserError

logger = logging.getLogger("titan")

# Short names for the hub corpora titan is usually pointed at: (repository, config name).
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "c4": ("allenai/c4", "en"),
    "fineweb": ("HuggingFaceFW/fineweb", None),
}
# File suffix -> the `datasets` builder that reads it.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_PATH_FIELD = "training.dataset_path"
_KINDS_HINT = "pass a .jsonl, .parquet or .txt file or a folder of them"


class DocumentSource(Protocol):
    """Random access, by global document number, to an endless sequence of documents."""

    def get(self, index: int) -> str:
        """Return the text of global document number ``index`` (0, 1, 2, ... forever)."""
        ...


def open_documents(
    dataset: str,
    dataset_path: str,
    seed: int,
    owned: Callable[[int], bool] | None = None,
    *,
    streaming: bool = False,
) -> DocumentSource:
    """Open the documents a run trains on.

    Args:
        dataset: ``"embedded"`` (the offline default), ``"c4"``, ``"fineweb"`` or any hub dataset
            name; ignored when ``dataset_path`` is set.
        dataset_path: a local ``.jsonl``/``.json``, ``.parquet`` or ``.txt`` file, or a folder of
            files of one kind; ``""`` to use ``dataset``.
        seed: seeds the per-epoch shuffle of map-style sources (streaming sources do not shuffle).
        owned: for streaming sources, says whether a document index will be asked for later, so
            that only those are kept while the stream skips ahead; ``None`` keeps every skipped one.
        streaming: read local files as a stream (tests use it to check the streaming path on
            local data); hub datasets always stream.

    Raises:
        UserError: the path is missing, unreadable, empty, or has no ``text`` column.
    """
    if dataset_path:
        return _open_local(dataset_path, seed, owned, streaming)
    if dataset in ("embedded", ""):
        return MapDocuments(_read_embedded_corpus(), seed)
    return _open_hub(dataset, owned)


class MapDocuments:
    """A map-style source: ``N`` documents served in a fresh seeded permutation each epoch."""

    def __init__(self, docs: Sequence[str], seed: int, name: str = "embedded corpus") -> None:
        """Wrap a random-access sequence of texts.

        Args:
            docs: the documents; ``docs[i]`` is read lazily, so a ``datasets`` column works.
            seed: the permutation of epoch ``e`` is seeded with ``seed + e``.
            name: how errors refer to this source.
        """
        if len(docs) == 0:
            raise UserError(f"{name} holds no documents; point the run at a non-empty dataset")
        self._docs = docs
        self._seed = seed
        self.num_documents = len(docs)
        # Rows of the global batch move through the data at slightly different speeds, so two
        # neighbouring epochs can be in use at once; keep both permutations.
        self._perms: OrderedDict[int, torch.Tensor] = OrderedDict()

    def get(self, index: int) -> str:
        """Return the text of global document number ``index``.

        Args:
            index: any non-negative integer; epoch ``index // N``, position ``index % N``.
        """
        epoch, position = divmod(index, self.num_documents)
        return _as_text(self._docs[int(self._permutation(epoch)[position])])

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(self._seed + epoch)
            # int32 halves the memory of a permutation of a large local dataset
            dtype = torch.int32 if self.num_documents < 2**31 else torch.int64
            perm = torch.randperm(self.num_documents, generator=gen, dtype=dtype)
            self._perms[epoch] = perm
            if len(self._perms) > 2:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm


class StreamingDocuments:
    """A forward-only source over an iterable that can be restarted from its beginning.

    Index ``i`` is the ``i``-th document of the endless repetition of the stream. Documents
    passed while skipping ahead are kept only if ``owned(i)`` says they will be asked for, and are
    dropped once read, so memory holds just the gap between the slowest and fastest reader.
    """

    def __init__(
        self,
        open_stream: Callable[[], Iterator[dict[str, Any]]],
        owned: Callable[[int], bool] | None,
        name: str,
    ) -> None:
        """Wrap a stream of rows.

        Args:
            open_stream: returns a fresh iterator over the rows, from the beginning.
            owned: whether a skipped index will be asked for later; ``None`` keeps all.
            name: how errors refer to this source (a field and value).
        """
        self._open = open_stream
        self._owned = owned or (lambda index: True)
        self._name = name
        self._cache: dict[int, str] = {}
        self._it: Iterator[dict[str, Any]] = iter(())
        self._next = 0  # global index of the row the iterator yields next
        self._epoch_start = 0  # global index of the current pass's first row
        self._restart(0)

    def get(self, index: int) -> str:
        """Return the text of global document number ``index``.

        Args:
            index: an index not read before (re-reading an index restarts the stream).
        """
        text = self._cache.pop(index, None)
        if text is not None:
            return text
        if index < self._next:
            # Already passed and not kept: only a caller that re-reads gets here. Correct but slow.
            logger.warning("%s: re-reading document %d restarts the stream", self._name, index)
            self._restart(0)
            self._cache.clear()
        while True:
            current, text = self._next, self._advance()
            if current == index:
                return text
            if self._owned(current):
                self._cache[current] = text

    def _advance(self) -> str:
        row = self._read_row()
        if row is None:
            if self._next == self._epoch_start:
                raise UserError(f"{self._name} yielded no documents; use a non-empty dataset")
            # NOTE: a stream has no random access; the next epoch is the same order again.
            self._restart(self._next)
            return self._advance()
        if "text" not in row:
            raise UserError(_no_text_column(self._name, list(row)))
        self._next += 1
        return _as_text(row["text"])

    def _read_row(self) -> dict[str, Any] | None:
        try:
            return next(self._it, None)
        except UserError:
            raise
        except Exception as err:  # a stream reads (and parses) lazily, so bad data surfaces here
            raise UserError(
                f"{self._name}: reading document {self._next} failed ({_innermost(err)}); "
                "check the data files or the dataset name"
            ) from err

    def _restart(self, start: int) -> None:
        self._it = iter(self._open())
        self._next = self._epoch_start = start


def _as_text(value: object) -> str:
    # Null text cells (they occur in scraped corpora) become empty documents rather than crashes.
    return "" if value is None else str(value)


def _no_text_column(name: str, columns: list[str]) -> str:
    return (
        f'{name} has no "text" column (found: {", ".join(columns) or "none"}); '
        'rename the column holding the documents to "text"'
    )


def _read_embedded_corpus() -> list[str]:
    path = embedded_assets_dir() / "corpus.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _local_files(dataset_path: str) -> tuple[str, list[str]]:
    """Return (builder name, sorted file list) for a local file or folder."""
    path = Path(dataset_path).expanduser()
    if not path.exists():
        raise UserError(f"{_PATH_FIELD}: {path} does not exist; {_KINDS_HINT}")
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in _BUILDERS and not p.name.startswith(".")
        )
        if not files:
            raise UserError(f"{_PATH_FIELD}: {path} holds no data files; {_KINDS_HINT}")
    kinds = sorted({p.suffix for p in files})
    if any(kind not in _BUILDERS for kind in kinds):
        raise UserError(f"{_PATH_FIELD}: {path} has suffix {kinds[0] or 'none'}; {_KINDS_HINT}")
    builders = {_BUILDERS[kind] for kind in kinds}
    if len(builders) > 1:
        raise UserError(
            f"{_PATH_FIELD}: {path} mixes file kinds ({', '.join(kinds)}); "
            "keep one kind per folder or point the field at one file"
        )
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"{_PATH_FIELD}: {path} is empty; add documents to it")
    return builders.pop(), [str(p) for p in files]


def _open_local(
    dataset_path: str, seed: int, owned: Callable[[int], bool] | None, streaming: bool
) -> DocumentSource:
    builder, files = _local_files(dataset_path)
    name = f"{_PATH_FIELD}: {dataset_path}"
    import datasets  # slow import; only for non-embedded data

    def load(stream: bool) -> Any:
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", streaming=stream)
        except Exception as err:  # datasets and pyarrow raise many unrelated types
            raise UserError(
                f"{name} could not be read as {builder} ({_innermost(err)}); "
                f"check the file format or {_KINDS_HINT}"
            ) from err

    if streaming:
        return StreamingDocuments(lambda: load(True), owned, name)
    ds = load(False)
    if "text" not in ds.column_names:
        raise UserError(_no_text_column(name, ds.column_names))
    if len(ds) == 0:
        raise UserError(f"{name} holds no documents; add documents to it")
    return MapDocuments(_TextColumn(ds.select_columns(["text"])), seed, name)


class _TextColumn(Sequence[str]):
    """Lazy random access to the ``text`` column of a map-style ``datasets.Dataset``."""

    def __init__(self, ds: Any) -> None:
        # NOTE: ds["text"] would copy the whole column into Python strings on older `datasets`.
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        return self._ds[index]["text"]


def _open_hub(dataset: str, owned: Callable[[int], bool] | None) -> DocumentSource:
    repo, config = HUB_DATASETS.get(dataset, (dataset, None))
    name = f"training.dataset: {dataset}"
    import datasets  # slow import; only for non-embedded data

    def load() -> Any:
        try:
            return datasets.load_dataset(repo, config, split="train", streaming=True)
        except Exception as err:  # network, auth and name errors all land here
            raise UserError(
                f"{name} could not be opened as hub dataset {repo} ({_innermost(err)}); check the name "
                'and network access, or use training.dataset_path or dataset "embedded"'
            ) from err

    return StreamingDocuments(load, owned, name)


def _innermost(err: BaseException) -> str:
    # `datasets` wraps the useful message (e.g. pyarrow's parse error) in generic ones.
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

"""Document sources: global document number ``i`` to text, for ``i = 0, 1, 2, ...`` forever.

Two kinds:

* Map-style (the embedded corpus, local files): random access to ``N`` documents. Index ``i`` is
  position ``i % N`` of epoch ``i // N``, and each epoch is its own permutation seeded with
  ``seed + epoch``, so every epoch is shuffled and the order is a function of the seed alone.
* Streaming (hub datasets): one forward iterator in the dataset's own order, with no shuffle.
  ``get`` must be called with indices that mostly increase; documents passed on the way that a
  caller will still need (the ``owned`` predicate) wait in a lookahead cache, the rest are dropped.
  At the end of the stream it restarts (the next epoch, in the same order).

A local or hub source that holds no text (every row empty or whitespace only) is refused when it
is opened: local files are checked whole, streams by their first ``TEXT_CHECK_ROWS`` rows. In
``.txt`` files a document is a line, and empty or whitespace-only lines are not documents.

Names ``training.dataset`` accepts (``training.dataset_path``, when set, wins over all of them):

* ``embedded`` (the default) and ``c4_test``: the small corpus shipped inside titan-core, read
  offline. ``c4_test`` is the name torchtitan gives its tiny local test set, so torchtitan configs
  that train on it run unchanged, on titan's corpus instead of torchtitan's files.
* ``c4`` and ``c4_validation``: ``allenai/c4`` (config ``en``), the train and validation splits;
  ``fineweb``: ``HuggingFaceFW/fineweb``; any other name is a hub repository. Hub datasets
  stream. Without the hub (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` set, or no network) the
  run is refused, in one line, when the data is opened: before any process group or write.

``datasets`` is imported only when a local or hub dataset is opened: it is slow to import, and the
embedded default does not need it. Its own logging and progress bars are silenced while titan reads
through it: titan reports a failure itself, in one line.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from titan_core.data.embedded import embedded_assets_dir
from titan_core.data.streaming import Mark, Marks, split_by_rank, with_state
from titan_core.errors import UserError

if TYPE_CHECKING:  # numpy and pyarrow come with `datasets`, imported only for its sources
    import numpy as np
    import pyarrow as pa

logger = logging.getLogger("titan")

# Short names for the hub corpora titan is usually pointed at: (repository, config name, split).
HUB_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "c4": ("allenai/c4", "en", "train"),
    "c4_validation": ("allenai/c4", "en", "validation"),
    "fineweb": ("HuggingFaceFW/fineweb", None, "train"),
}
# Names that mean the embedded corpus. NOTE: "c4_test" is torchtitan's bundled C4 sample; titan
# ships its own small corpus instead, so configs written for torchtitan run offline unchanged.
EMBEDDED_NAMES = ("embedded", "", "c4_test")
# Environment switches with which `huggingface_hub` / `datasets` refuse to reach the hub.
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# File suffix -> the `datasets` builder that reads it.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_KINDS_HINT = "pass a .jsonl, .parquet or .txt file or a folder of them"
# A stream cannot be scanned before training: this many rows without text at its start refuse it.
TEXT_CHECK_ROWS = 1000


class DocumentSource(Protocol):
    """Random access, by global document number, to an endless sequence of documents."""

    def get(self, index: int) -> str:
        """Return the text of global document number ``index`` (0, 1, 2, ... forever)."""
        ...

    @property
    def pass_length(self) -> int | None:
        """Documents in one pass over the data, once known (a stream knows it only after it
        has wrapped around); ``None`` before."""
        ...


def open_documents(
    dataset: str,
    dataset_path: str,
    seed: int,
    owned: Callable[[int], bool] | None = None,
    *,
    streaming: bool = False,
    section: str = "training",
    part: tuple[int, int] = (0, 1),
) -> DocumentSource:
    """Open the documents a run trains (or validates) on.

    Args:
        dataset: ``"embedded"`` (the offline default) or ``"c4_test"`` (the same corpus),
            ``"c4"``, ``"c4_validation"``, ``"fineweb"`` or any hub dataset name; ignored when
            ``dataset_path`` is set.
        dataset_path: a local ``.jsonl``/``.json``, ``.parquet`` or ``.txt`` file, or a folder of
            files of one kind; ``""`` to use ``dataset``.
        seed: seeds the per-epoch shuffle of map-style sources (streaming sources do not shuffle).
        owned: for streaming sources, says whether a document index will be asked for later, so
            that only those are kept while the stream skips ahead; ``None`` keeps every skipped one.
        streaming: read local files as a stream (tests use it to check the streaming path on
            local data); hub datasets always stream.
        section: the config section whose ``dataset``/``dataset_path`` errors name.
        part: ``(rank, degree)`` of data parallelism: a stream with at least ``degree`` shards
            is read by shard, this rank's only (see :mod:`titan_core.data.streaming`).

    Raises:
        UserError: the path is missing, unreadable or empty, has no ``text`` column, or its
            documents hold no text (for a stream: its first ``TEXT_CHECK_ROWS`` rows); or a hub
            dataset cannot be reached (offline, no network, unknown name).
    """
    if dataset_path:
        field = f"{section}.dataset_path"
        return _open_local(dataset_path, seed, owned, streaming, field, part)
    if dataset in EMBEDDED_NAMES:
        return MapDocuments(_read_embedded_corpus(), seed)
    return _open_hub(dataset, owned, section, part)


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

    @property
    def pass_length(self) -> int:
        return self.num_documents

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
    Where the stream has a ``state_dict``, the position before each document a reader may still
    start at is kept (see :mod:`titan_core.data.streaming`), so a resume need not read again.

    Attributes:
        per_rank: the stream is this data-parallel rank's own shards (indices are rank-local).
        rows_read: rows taken from the stream so far (a resume's extra reading shows here).
    """

    def __init__(
        self,
        open_stream: Callable[[], Iterator[dict[str, Any]]],
        owned: Callable[[int], bool] | None,
        name: str,
        *,
        skip_blank: bool = False,
        per_rank: bool = False,
    ) -> None:
        """Wrap a stream of rows, and check that its first rows hold text.

        Args:
            open_stream: returns a fresh iterator over the rows, from the beginning.
            owned: whether a skipped index will be asked for later; ``None`` keeps all.
            name: how errors refer to this source (a field and value).
            skip_blank: rows whose text is empty or whitespace only are not documents (``.txt``).
            per_rank: ``open_stream`` yields only this data-parallel rank's shards.

        Raises:
            UserError: the stream is empty, or its first ``TEXT_CHECK_ROWS`` rows hold no text.
        """
        self._open = open_stream
        self._owned = owned or (lambda index: True)
        self._name = name
        self._skip_blank = skip_blank
        self.per_rank = per_rank
        self.rows_read = 0
        self._cache: dict[int, str] = {}
        self._it: Iterator[tuple[dict[str, Any], dict | None]] = iter(())
        self._state: dict | None = None  # the stream's own state after the last row read
        self._marks = Marks()
        self._next = 0  # global index of the document the iterator yields next
        self._epoch_start = 0  # global index of the current pass's first document
        self._pass_length: int | None = None  # documents per pass, known after the first wrap
        self._restart(0)
        self._check_text()

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
        with _quiet_datasets():  # per call, not per row read: a get may pass many rows
            while True:
                current, text = self._next, self._advance()
                if current == index:
                    return text
                if self._owned(current):
                    self._cache[current] = text

    @property
    def pass_length(self) -> int | None:
        return self._pass_length

    def keep_from(self, index: int) -> None:
        """No reader will start at a document before ``index`` any more."""
        self._marks.keep_from(index)

    def position(self, oldest: int) -> dict[str, Any]:
        """Where a resume must start so that document ``oldest`` is read again (JSON-able)."""
        mark = self._marks.at(oldest) if oldest < self._next else None
        if mark is None:  # nothing from ``oldest`` on has been read: resume from here
            mark = Mark(self._next, self._epoch_start, self._state)
        return {**mark.as_dict(), "pass_length": self._pass_length}

    def resume(self, position: dict[str, Any]) -> None:
        """Continue from a :meth:`position`: its document is the next one read.

        A stream without a state of its own starts its pass again and reads up to there.
        """
        self._cache.clear()
        self._marks.clear()
        self._pass_length = position.get("pass_length")
        state, start = position.get("state"), int(position["pass_start"])
        if state is None:
            self._restart(start)
            return
        try:
            self._restart(int(position["index"]), state=state, pass_start=start)
        except Exception as err:  # the data changed, or the state is another stream's
            raise UserError(
                f"checkpoint data state: {self._name} cannot continue from the saved stream "
                f"position ({_innermost(err)}); resume with the original data or start a fresh run"
            ) from err

    def _advance(self) -> str:
        while True:
            before = self._state
            row = self._read_row()
            if row is None:
                if self._next == self._epoch_start:
                    raise UserError(f"{self._name} yielded no documents; use a non-empty dataset")
                # NOTE: a stream has no random access; the next epoch is the same order again.
                if self._pass_length is None:
                    self._pass_length = self._next - self._epoch_start
                self._restart(self._next)
                continue
            text = self._text(row)
            if not (self._skip_blank and _is_blank(text)):
                self._marks.add(Mark(self._next, self._epoch_start, before))
                self._next += 1
                return text

    def _check_text(self) -> None:
        """Read rows until one holds text, then put them back in front of the stream."""
        items: list[tuple[dict[str, Any], dict | None]] = []
        try:
            with _quiet_datasets():
                while len(items) < TEXT_CHECK_ROWS:
                    row = self._read_row("its first rows")
                    if row is None:
                        break
                    items.append((row, self._state))
                    if not _is_blank(self._text(row)):
                        return
        finally:
            self._it = itertools.chain(items, self._it)
            self._state = None  # the rows put back come first again
        if not items:
            raise UserError(f"{self._name} yielded no documents; use a non-empty dataset")
        raise UserError(_no_text(self._name, len(items), whole=len(items) < TEXT_CHECK_ROWS))

    def _text(self, row: dict[str, Any]) -> str:
        if "text" not in row:
            raise UserError(_no_text_column(self._name, list(row)))
        return _as_text(row["text"])

    def _read_row(self, where: str = "") -> dict[str, Any] | None:
        try:
            item = next(self._it, None)
            if item is None:
                return None
            row, self._state = item
            return row
        except UserError:
            raise
        except Exception as err:  # a stream reads (and parses) lazily, so bad data surfaces here
            raise UserError(
                f"{self._name}: reading {where or f'document {self._next}'} failed "
                f"({_innermost(err)}); check the data files or the dataset name"
            ) from err

    def _restart(
        self, start: int, state: dict | None = None, pass_start: int | None = None
    ) -> None:
        """Open the stream again: at its beginning as document ``start``, or at ``state``."""
        stream = self._open()
        if state is not None:
            stream.load_state_dict(state)
        self._it = with_state(stream, self._count_row)
        self._state = state
        self._next = start
        self._epoch_start = start if pass_start is None else pass_start

    def _count_row(self) -> None:
        self.rows_read += 1


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' log records and progress bars while it reads for titan.

    NOTE: its JSON loader logs a parse error at ERROR level (printed twice: by its own handler and
    by the root logger) and draws a "Generating train split" bar before it raises; the UserError
    made from the exception says it once. Swapping handlers is cheap (``setLevel`` would clear
    every logger's cache), so streams do it on every ``get``. ``TITAN_DEBUG=1`` keeps the output.
    """
    if os.environ.get("TITAN_DEBUG") == "1":
        yield
        return
    import datasets
    from datasets import utils as ds_utils

    log = logging.getLogger("datasets")
    saved = log.handlers, log.propagate
    log.handlers, log.propagate = [_DROP], False
    # An explicit HF_DATASETS_DISABLE_PROGRESS_BARS wins (and toggling it would warn).
    toggle_bars = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is None
    bars_were_off = ds_utils.are_progress_bars_disabled()
    if toggle_bars:
        ds_utils.disable_progress_bars()
    try:
        yield
    finally:
        log.handlers, log.propagate = saved
        if toggle_bars and not bars_were_off:
            ds_utils.enable_progress_bars()


# Stands in for the `datasets` logger's handlers: with none, logging would print to stderr anyway.
_DROP = logging.NullHandler()


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _no_text(name: str, rows: int, whole: bool) -> str:
    which = f"all {rows} rows" if whole else f"the first {rows} rows"
    return (
        f"{name} holds no text: {which} are empty or whitespace only, so training would see only "
        'document boundary tokens; put the documents in the "text" field or remove the empty rows'
    )


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


def _local_files(dataset_path: str, field: str) -> tuple[str, list[str]]:
    """Return (builder name, sorted file list) for a local file or folder."""
    path = Path(dataset_path).expanduser()
    if not path.exists():
        raise UserError(f"{field}: {path} does not exist; {_KINDS_HINT}")
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in _BUILDERS and not p.name.startswith(".")
        )
        if not files:
            raise UserError(f"{field}: {path} holds no data files; {_KINDS_HINT}")
    kinds = sorted({p.suffix for p in files})
    if any(kind not in _BUILDERS for kind in kinds):
        raise UserError(f"{field}: {path} has suffix {kinds[0] or 'none'}; {_KINDS_HINT}")
    builders = {_BUILDERS[kind] for kind in kinds}
    if len(builders) > 1:
        raise UserError(
            f"{field}: {path} mixes file kinds ({', '.join(kinds)}); "
            "keep one kind per folder or point the field at one file"
        )
    if all(p.stat().st_size == 0 for p in files):
        raise UserError(f"{field}: {path} is empty; add documents to it")
    return builders.pop(), [str(p) for p in files]


def _open_local(
    dataset_path: str,
    seed: int,
    owned: Callable[[int], bool] | None,
    streaming: bool,
    field: str,
    part: tuple[int, int] = (0, 1),
) -> DocumentSource:
    builder, files = _local_files(dataset_path, field)
    name = f"{field}: {dataset_path}"
    # NOTE: `datasets` reads a .txt file as one row per line; an empty line separates, it is no
    # document (and would train on boundary tokens alone).
    skip_blank = builder == "text"
    import datasets  # slow import; only for non-embedded data

    def load(stream: bool) -> Any:
        try:
            with _quiet_datasets():
                return datasets.load_dataset(
                    builder, data_files=files, split="train", streaming=stream
                )
        except Exception as err:  # datasets and pyarrow raise many unrelated types
            raise UserError(
                f"{name} could not be read as {builder} ({_innermost(err)}); "
                f"check the file format or {_KINDS_HINT}"
            ) from err

    if streaming:
        opener, per_rank = split_by_rank(lambda: load(True), *part, name)
        return StreamingDocuments(opener, owned, name, skip_blank=skip_blank, per_rank=per_rank)
    ds = load(False)
    if "text" not in ds.column_names:
        raise UserError(_no_text_column(name, ds.column_names))
    if len(ds) == 0:
        raise UserError(f"{name} holds no documents; add documents to it")
    return MapDocuments(_TextColumn.checked(ds, name, skip_blank), seed, name)


class _TextColumn(Sequence[str]):
    """Lazy random access to the ``text`` column of a map-style ``datasets.Dataset``."""

    def __init__(self, ds: Any, rows: np.ndarray | None = None) -> None:
        """Wrap a dataset.

        Args:
            ds: a ``datasets.Dataset`` with a ``text`` column.
            rows: the dataset rows that are documents, in order; ``None`` for all of them.
        """
        # NOTE: ds["text"] would copy the whole column into Python strings on older `datasets`.
        self._ds = ds.select_columns(["text"])
        self._rows = rows
        # NOTE: rows of the global batch that read the same document (a dataset with fewer
        # documents than rows) then share one string, not a copy each.
        self._last: tuple[int, Any] = (-1, "")

    @classmethod
    def checked(cls, ds: Any, name: str, skip_blank: bool) -> _TextColumn:
        """Wrap ``ds`` after checking, in Arrow, that some row holds text.

        Args:
            ds: a non-empty ``datasets.Dataset`` with a ``text`` column, as loaded (no index map).
            name: how errors refer to it.
            skip_blank: leave out the rows whose text is empty or whitespace only.

        Raises:
            UserError: every row is empty or whitespace only.
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        column = ds.data.column("text")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            if pa.types.is_null(column.type):  # every cell null, e.g. {"text": null} rows
                raise UserError(_no_text(name, len(ds), whole=True))
            return cls(ds)  # numbers and the like: their str() is never blank
        if skip_blank:
            keep = np.flatnonzero(_has_text(column).to_numpy(zero_copy_only=False))
            if len(keep) == 0:
                raise UserError(_no_text(name, len(ds), whole=True))
            if len(keep) == len(ds):
                return cls(ds)
            return cls(ds, keep.astype(np.int32 if len(ds) < 2**31 else np.int64))
        # Stop at the first chunk with text: only data without any is read to its end.
        if not any(pc.any(_has_text(chunk)).as_py() for chunk in column.chunks):
            raise UserError(_no_text(name, len(ds), whole=True))
        return cls(ds)

    def __len__(self) -> int:
        return len(self._ds) if self._rows is None else len(self._rows)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        row = index if self._rows is None else int(self._rows[index])
        if self._last[0] != row:
            self._last = (row, self._ds[row]["text"])
        return self._last[1]


def _has_text(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Per string: not null, not empty, not whitespace only (the Arrow form of ``_is_blank``)."""
    import pyarrow.compute as pc

    blank = pc.or_(pc.equal(pc.utf8_length(texts), 0), pc.utf8_is_space(texts))
    return pc.invert(blank.fill_null(True))


def _open_hub(
    dataset: str, owned: Callable[[int], bool] | None, section: str, part: tuple[int, int]
) -> DocumentSource:
    repo, config, split = HUB_DATASETS.get(dataset, (dataset, None, "train"))
    name = f"{section}.dataset: {dataset}"
    default = ", the default" if section == "training" else ""
    fix = (
        f"download it and pass its files with --{section}.dataset_path, or use the embedded "
        f"corpus (--{section}.dataset embedded{default})"
    )
    offline = [var for var in _OFFLINE_VARS if _env_true(var)]
    if offline:  # fail now, in one line, rather than after `datasets`' own offline retries
        raise UserError(
            f"{name} streams hub dataset {repo} ({split} split), but {offline[0]} is set so the "
            f"hub cannot be reached; {fix}"
        )
    import datasets  # slow import; only for non-embedded data

    def load() -> Any:
        try:
            with _quiet_datasets():
                return datasets.load_dataset(repo, config, split=split, streaming=True)
        except Exception as err:  # network, auth and name errors all land here
            raise UserError(
                f"{name} could not be opened as hub dataset {repo} ({split} split: "
                f"{_innermost(err)}); check the name and network access, or {fix}"
            ) from err

    opener, per_rank = split_by_rank(load, *part, name)
    return StreamingDocuments(opener, owned, name, per_rank=per_rank)


def _env_true(var: str) -> bool:
    # The values huggingface_hub itself reads as "on".
    return os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _innermost(err: BaseException) -> str:
    # `datasets` wraps the useful message (e.g. pyarrow's parse error) in generic ones.
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

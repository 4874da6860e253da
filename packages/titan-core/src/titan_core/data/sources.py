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

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from titan_core.data.embedded import embedded_assets_dir
from titan_core.data.rows import (
    as_text,
    innermost,
    no_text,
    no_text_column,
    quiet_datasets,
)
from titan_core.data.streaming import BlockShuffle, StreamingDocuments, split_by_rank
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
    shuffle_buffer: int = 0,
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
        shuffle_buffer: streams are served in seeded blocks of this many documents.

    Raises:
        UserError: the path is missing, unreadable or empty, has no ``text`` column, or its
            documents hold no text (for a stream: its first ``TEXT_CHECK_ROWS`` rows); or a hub
            dataset cannot be reached (offline, no network, unknown name).
    """
    if dataset_path:
        field = f"{section}.dataset_path"
        shuffle = BlockShuffle(shuffle_buffer, seed)
        return _open_local(dataset_path, seed, owned, streaming, field, part, shuffle)
    if dataset in EMBEDDED_NAMES:
        return MapDocuments(_read_embedded_corpus(), seed)
    return _open_hub(dataset, owned, section, part, BlockShuffle(shuffle_buffer, seed))


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
        return as_text(self._docs[int(self._permutation(epoch)[position])])

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
    shuffle: BlockShuffle | None = None,
) -> DocumentSource:
    builder, files = _local_files(dataset_path, field)
    name = f"{field}: {dataset_path}"
    # NOTE: `datasets` reads a .txt file as one row per line; an empty line separates, it is no
    # document (and would train on boundary tokens alone).
    skip_blank = builder == "text"
    import datasets  # slow import; only for non-embedded data

    def load(stream: bool) -> Any:
        try:
            with quiet_datasets():
                return datasets.load_dataset(
                    builder, data_files=files, split="train", streaming=stream
                )
        except Exception as err:  # datasets and pyarrow raise many unrelated types
            raise UserError(
                f"{name} could not be read as {builder} ({innermost(err)}); "
                f"check the file format or {_KINDS_HINT}"
            ) from err

    if streaming:
        opener, per_rank = split_by_rank(lambda: load(True), *part, name)
        return StreamingDocuments(
            opener, owned, name, skip_blank=skip_blank, per_rank=per_rank, shuffle=shuffle
        )
    ds = load(False)
    if "text" not in ds.column_names:
        raise UserError(no_text_column(name, ds.column_names))
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
                raise UserError(no_text(name, len(ds), whole=True))
            return cls(ds)  # numbers and the like: their str() is never blank
        if skip_blank:
            keep = np.flatnonzero(_has_text(column).to_numpy(zero_copy_only=False))
            if len(keep) == 0:
                raise UserError(no_text(name, len(ds), whole=True))
            if len(keep) == len(ds):
                return cls(ds)
            return cls(ds, keep.astype(np.int32 if len(ds) < 2**31 else np.int64))
        # Stop at the first chunk with text: only data without any is read to its end.
        if not any(pc.any(_has_text(chunk)).as_py() for chunk in column.chunks):
            raise UserError(no_text(name, len(ds), whole=True))
        return cls(ds)

    def __len__(self) -> int:
        return len(self._ds) if self._rows is None else len(self._rows)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        row = index if self._rows is None else int(self._rows[index])
        if self._last[0] != row:
            self._last = (row, self._ds[row]["text"])
        return self._last[1]


def _has_text(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Per string: not null, not empty, not whitespace only (the Arrow form of ``is_blank``)."""
    import pyarrow.compute as pc

    blank = pc.or_(pc.equal(pc.utf8_length(texts), 0), pc.utf8_is_space(texts))
    return pc.invert(blank.fill_null(True))


def _open_hub(
    dataset: str,
    owned: Callable[[int], bool] | None,
    section: str,
    part: tuple[int, int],
    shuffle: BlockShuffle,
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
            with quiet_datasets():
                return datasets.load_dataset(repo, config, split=split, streaming=True)
        except Exception as err:  # network, auth and name errors all land here
            raise UserError(
                f"{name} could not be opened as hub dataset {repo} ({split} split: "
                f"{innermost(err)}); check the name and network access, or {fix}"
            ) from err

    opener, per_rank = split_by_rank(load, *part, name)
    return StreamingDocuments(opener, owned, name, per_rank=per_rank, shuffle=shuffle)


def _env_true(var: str) -> bool:
    # The values huggingface_hub itself reads as "on".
    return os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE")

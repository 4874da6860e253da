"""Streams at scale: each data-parallel rank reads its own shards, and resumes where it stopped.

A stream with at least as many shards (files) as data-parallel ranks is split by shard: rank
``r`` of ``D`` reads shards ``r, r + D, r + 2D, ...`` (``datasets``' ``IterableDataset.shard``), so
the ranks together read each row about once. Its documents are numbered per rank, and row ``j``
of the global batch reads rank-local documents ``l, l + G/D, l + 2G/D, ...`` where ``l`` is ``j``'s
place among the rank's rows (see :mod:`titan_core.data.loader`). The global batches are the same
for the same data-parallel degree; another degree splits the stream differently.

A stream with fewer shards than ranks cannot be split that way: every rank reads it whole and keeps
the documents its rows own, as map-style sources do, so the batches are the same in every layout.

Where the stream has its own position (``state_dict``, as ``datasets`` streams do), the position
before each document is kept while a row may still start there; a checkpoint records the one
before the oldest document any of the rank's rows still reads, so a resume reads again only the
documents between the slowest and the fastest row (plus what ``datasets`` skips within the shard
it resumes in), not everything before the resume point.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from titan_core.data import rows as rows_module
from titan_core.data.rows import (
    as_text,
    innermost,
    is_blank,
    no_text,
    no_text_column,
    quiet_datasets,
)
from titan_core.errors import UserError

logger = logging.getLogger("titan")


def split_by_rank(
    load: Callable[[], Any], rank: int, count: int, name: str
) -> tuple[Callable[[], Any], bool]:
    """This rank's stream opener, and whether it reads only this rank's shards.

    Args:
        load: opens the whole stream (an ``IterableDataset``, or any iterable of rows).
        rank: this rank's index among the data-parallel ranks.
        count: the data-parallel degree.
        name: how the log refers to the stream.
    """
    if count == 1:
        return load, False
    stream = load()
    shards = getattr(stream, "num_shards", 1) if hasattr(stream, "shard") else 1
    if shards < count:
        logger.warning(
            "%s has %d shard(s), fewer than the %d data-parallel ranks: every rank reads the whole "
            "stream and keeps its own documents; split the data into at least %d files to have "
            "each rank read only its share",
            name,
            shards,
            count,
            count,
        )
        return load, False
    return (lambda: load().shard(num_shards=count, index=rank, contiguous=False)), True


@dataclass
class Mark:
    """Where document ``index`` starts: the stream's own state before its row (None: the
    start of the pass that began at document ``pass_start``)."""

    index: int
    pass_start: int
    state: dict | None

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "pass_start": self.pass_start, "state": self.state}


class Marks:
    """The start of every document read that a row may still begin at, oldest first."""

    def __init__(self) -> None:
        self._marks: deque[Mark] = deque()

    def add(self, mark: Mark) -> None:
        self._marks.append(mark)

    def keep_from(self, index: int) -> None:
        """Forget the marks of documents before ``index``: no row starts there any more."""
        while self._marks and self._marks[0].index < index:
            self._marks.popleft()

    def at(self, index: int) -> Mark | None:
        for mark in self._marks:
            if mark.index == index:
                return mark
        return None

    def clear(self) -> None:
        self._marks.clear()

    def __len__(self) -> int:
        return len(self._marks)


def with_state(stream: Any, count: Callable[[], None]) -> Any:
    """Iterate ``stream``'s rows as ``(row, its state after the row)``; ``count()`` per row read.

    The state is ``stream.state_dict()`` where the stream has one, else None.
    """
    stateful = callable(getattr(stream, "state_dict", None))
    for row in stream:
        count()
        yield row, (stream.state_dict() if stateful else None)


class BlockShuffle:
    """A seeded shuffle buffer whose state is a position: the stream is read ``size`` documents
    at a time and each block is served in its own seeded order.

    Document ``i`` of the served order lies in the block starting at ``i - i % size``, so a resume
    reads that block again (at most ``size`` documents) instead of saving the buffer's texts.
    Documents mix within a block, not across blocks; ``size`` 0 or 1 serves the stream's order.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self._served: list[str] = []  # the current block's rest, next one last

    def reset(self) -> None:
        self._served = []

    def block_start(self, index: int) -> int:
        return index - index % self.size if self.size > 1 else index

    def take(self, index: int, read: Callable[[], str]) -> str:
        """Served document ``index`` (the next one); ``read()`` gives the stream's next."""
        if self.size <= 1:
            return read()
        if not self._served:  # ``index`` starts a block
            docs = [read() for _ in range(self.size)]
            seed = (self.seed * 0x9E3779B97F4A7C15 + index) % 2**63
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed))
            self._served = [docs[i] for i in reversed(order.tolist())]
        return self._served.pop()


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
        shuffle: BlockShuffle | None = None,
    ) -> None:
        """Wrap a stream of rows, and check that its first rows hold text.

        Args:
            open_stream: returns a fresh iterator over the rows, from the beginning.
            owned: whether a skipped index will be asked for later; ``None`` keeps all.
            name: how errors refer to this source (a field and value).
            skip_blank: rows whose text is empty or whitespace only are not documents (``.txt``).
            per_rank: ``open_stream`` yields only this data-parallel rank's shards.
            shuffle: serves the documents in seeded blocks (``training.shuffle_buffer``).

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
        self._marks = Marks()  # keyed by ``_raw``
        self._shuffle = shuffle or BlockShuffle(0, 0)
        self._next = 0  # index of the document served next
        self._raw = 0  # documents read from the stream (served ones and a block's rest)
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
        with quiet_datasets():  # per call, not per row read: a get may pass many rows
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
        self._marks.keep_from(self._shuffle.block_start(index))

    def position(self, oldest: int) -> dict[str, Any]:
        """Where a resume must start so that document ``oldest`` is read again (JSON-able)."""
        start = self._shuffle.block_start(oldest)
        mark = self._marks.at(start) if start < self._raw else None
        if mark is None:  # nothing from ``oldest``'s block on has been read: resume from here
            mark = Mark(self._raw, self._epoch_start, self._state)
        return {**mark.as_dict(), "pass_length": self._pass_length}

    def resume(self, position: dict[str, Any]) -> None:
        """Continue from a :meth:`position`: its document is the next one read.

        A stream without a state of its own starts again and reads up to there.
        """
        self._cache.clear()
        self._marks.clear()
        self._pass_length = position.get("pass_length")
        state, start, index = position.get("state"), int(position["pass_start"]), position["index"]
        if state is None:  # a pass's first document needs no state; other ones do
            self._restart(start if index == start else 0)
            return
        try:
            self._restart(int(index), state=state, pass_start=start)
        except Exception as err:  # the data changed, or the state is another stream's
            raise UserError(
                f"checkpoint data state: {self._name} cannot continue from the saved stream "
                f"position ({innermost(err)}); resume with the original data or start a fresh run"
            ) from err

    def _advance(self) -> str:
        text = self._shuffle.take(self._next, self._read_document)
        self._next += 1
        return text

    def _read_document(self) -> str:
        while True:
            before = self._state
            row = self._read_row()
            if row is None:
                if self._raw == self._epoch_start:
                    raise UserError(f"{self._name} yielded no documents; use a non-empty dataset")
                # NOTE: a stream has no random access; the next epoch is the same order again.
                if self._pass_length is None:
                    self._pass_length = self._raw - self._epoch_start
                self._reopen(self._raw)
                continue
            text = self._text(row)
            if not (self._skip_blank and is_blank(text)):
                self._marks.add(Mark(self._raw, self._epoch_start, before))
                self._raw += 1
                return text

    def _check_text(self) -> None:
        """Read rows until one holds text, then put them back in front of the stream."""
        items: list[tuple[dict[str, Any], dict | None]] = []
        try:
            with quiet_datasets():
                while len(items) < rows_module.TEXT_CHECK_ROWS:
                    row = self._read_row("its first rows")
                    if row is None:
                        break
                    items.append((row, self._state))
                    if not is_blank(self._text(row)):
                        return
        finally:
            self._it = itertools.chain(items, self._it)
            self._state = None  # the rows put back come first again
        if not items:
            raise UserError(f"{self._name} yielded no documents; use a non-empty dataset")
        raise UserError(
            no_text(self._name, len(items), whole=len(items) < rows_module.TEXT_CHECK_ROWS)
        )

    def _text(self, row: dict[str, Any]) -> str:
        if "text" not in row:
            raise UserError(no_text_column(self._name, list(row)))
        return as_text(row["text"])

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
                f"({innermost(err)}); check the data files or the dataset name"
            ) from err

    def _restart(
        self, start: int, state: dict | None = None, pass_start: int | None = None
    ) -> None:
        """Serve document ``start`` next, read from the stream's beginning or ``state``."""
        self._reopen(start, state, pass_start)
        self._next = start
        self._shuffle.reset()

    def _reopen(self, start: int, state: dict | None = None, pass_start: int | None = None) -> None:
        """Open the stream again: at its beginning as document ``start``, or at ``state``."""
        stream = self._open()
        if state is not None:
            stream.load_state_dict(state)
        self._it = with_state(stream, self._count_row)
        self._state = state
        self._raw = start
        self._epoch_start = start if pass_start is None else pass_start

    def _count_row(self) -> None:
        self.rows_read += 1

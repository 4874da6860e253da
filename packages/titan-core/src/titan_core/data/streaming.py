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

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

"""The global batch: a function of the seed, the data and the step only.

The global batch has ``G`` rows, each a window of ``seq_len + 1`` tokens (inputs are the first
``seq_len``, labels the last ``seq_len``). Row ``j`` reads its own sub-stream of documents, global
numbers ``j, j + G, j + 2G, ...``, each tokenized as ``[bos] + text + [eos]`` and concatenated;
consecutive windows are cut from that token stream with no overlap and no padding. A document is
tokenized only as far as the windows reach, a piece at a time (see
:class:`~titan_core.data.tokenizer.DocumentTokens`): a huge document costs the memory of its text
and of one piece's tokens, not of all its tokens.

Because a row never depends on which rank reads it, every data-parallel layout with the same ``G``
trains on the same tokens at the same step: DP rank ``r`` of ``D`` just reads rows
``[r*G/D, (r+1)*G/D)`` and splits them into ``G/(D*b)`` microbatches of ``b`` rows. The state of
a row is ``(k, offset)``, the document it is in and how many of its tokens were used, so a
checkpoint saved under one layout resumes under another (merge the ranks' ``rows`` dicts).

A stream split by shard over the data-parallel ranks (see :mod:`titan_core.data.streaming`) is the
exception: each rank numbers its own documents, row ``j`` reading the rank's documents
``l, l + G/D, ...`` with ``l`` its place among the rank's rows. Its batches are the same for the same
data-parallel degree ``D``; the checkpoint also records where each rank's stream stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from titan_core.data.sources import EMBEDDED_NAMES, DocumentSource, open_documents
from titan_core.data.tokenizer import DocumentTokens, Tokenizer
from titan_core.errors import UserError

logger = logging.getLogger("titan")

Microbatch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Row:
    k: int = 0  # document number within the row's sub-stream (global number j + k*G)
    offset: int = 0  # tokens of that document already used
    doc: DocumentTokens | None = None  # document k, once read


class GlobalBatchLoader:
    """Serves this DP rank's slice of the layout-independent global batch, step after step.

    Attributes:
        grad_accum_steps: microbatches per step, ``G / (D * b)``.
        rows: the global batch rows this rank reads.
    """

    def __init__(
        self,
        source: DocumentSource | None,
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        global_batch_size: int,
        local_batch_size: int,
        dp_rank: int,
        dp_degree: int,
        dataset: str = "embedded",
        dataset_path: str = "",
        seed: int = 0,
        streaming: bool = False,
        shuffle_buffer: int = 0,
    ) -> None:
        """Check the layout, then open the documents if no source is given.

        Args:
            source: the documents; ``None`` opens ``dataset``/``dataset_path`` with ``seed``.
            tokenizer: turns each document into ids; its BOS and EOS mark document boundaries.
            seq_len: tokens per row of inputs (each window holds ``seq_len + 1``).
            global_batch_size: ``G``, rows per optimizer step over all DP ranks.
            local_batch_size: ``b``, rows per microbatch on one rank.
            dp_rank: this rank's index among the data-parallel ranks.
            dp_degree: ``D``, the number of data-parallel ranks.
            dataset: see :func:`open_documents`; used only when ``source`` is ``None``.
            dataset_path: see :func:`open_documents`; used only when ``source`` is ``None``.
            seed: see :func:`open_documents`; used only when ``source`` is ``None``.
            streaming: read local files as a stream (``training.dataset_streaming``).
            shuffle_buffer: a stream's documents come in seeded blocks of this many.

        Raises:
            UserError: ``G`` is not a multiple of ``D * b``, or a size is not positive.
        """
        self.grad_accum_steps = _check_layout(
            seq_len, global_batch_size, local_batch_size, dp_degree
        )
        if not 0 <= dp_rank < dp_degree:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_degree})")
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        per_rank = global_batch_size // dp_degree
        self.rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        self._rows = {j: _Row() for j in self.rows}
        self._tokenizer = tokenizer
        self.dp_rank, self.dp_degree = dp_rank, dp_degree
        if source is None:
            source = open_documents(
                dataset, dataset_path, seed, owned=self.will_read, streaming=streaming,
                part=(dp_rank, dp_degree), shuffle_buffer=shuffle_buffer,
            )  # fmt: skip
        self._source = source
        # A stream of this rank's own shards numbers its documents per rank.
        self._per_rank = bool(getattr(source, "per_rank", False))

    def will_read(self, index: int) -> bool:
        """Whether this rank will still ask for global document ``index``.

        Streaming sources use it to keep only the documents that this rank's rows are yet to
        reach while they skip ahead.

        Args:
            index: a global document number.
        """
        if self._per_rank:
            k, place = divmod(index, len(self.rows))
            return k >= self._rows[self.rows.start + place].k
        row = self._rows.get(index % self.global_batch_size)
        return row is not None and index // self.global_batch_size >= row.k

    def _document(self, j: int, k: int) -> int:
        """The source's number for document ``k`` of row ``j``."""
        if self._per_rank:
            return j - self.rows.start + k * len(self.rows)
        return j + k * self.global_batch_size

    def next_batch(self) -> list[Microbatch]:
        """Return this rank's part of the next global batch.

        Returns:
            ``grad_accum_steps`` microbatches of ``(inputs, labels)``, each ``(b, seq_len)`` int64;
            microbatch ``i`` holds rows ``rows[i*b : (i+1)*b]``.
        """
        windows = torch.tensor([self._window(j) for j in self.rows], dtype=torch.int64)
        if hasattr(self._source, "keep_from"):
            self._source.keep_from(self._oldest_document())
        b = self.local_batch_size
        # (G/D, seq_len + 1) -> A x ((b, seq_len), (b, seq_len)), labels shifted by one token
        return [
            (windows[i : i + b, :-1].contiguous(), windows[i : i + b, 1:].contiguous())
            for i in range(0, len(self.rows), b)
        ]

    def __iter__(self) -> Iterator[list[Microbatch]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Return the position of this rank's rows, as plain ints.

        Returns:
            ``{"rows": {j: (k, offset)}, "global_batch_size": G, "seq_len": seq_len}``, and for a
            stream ``"streams": {dp_rank: position}``; the ``rows`` and ``streams`` dicts of all
            ranks merge into the state of the whole global batch.
        """
        state: dict[str, Any] = {
            "rows": {j: (row.k, row.offset) for j, row in self._rows.items()},
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
        }
        if hasattr(self._source, "position"):
            position = self._source.position(self._oldest_document())
            position.update(dp_degree=self.dp_degree, per_rank=self._per_rank)
            state["streams"] = {str(self.dp_rank): position}
        return state

    def _oldest_document(self) -> int:
        """The earliest document a row of this rank still reads."""
        return min(self._document(j, row.k) for j, row in self._rows.items())

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state saved under any DP layout with the same global batch size.

        Args:
            state: a :meth:`state_dict`, or a merge of several, holding at least this rank's rows;
                row keys may be ints or strings and positions tuples or lists (as after JSON).

        Raises:
            UserError: the global batch size differs or rows of this rank are missing.
        """
        saved_g = int(state["global_batch_size"])
        if saved_g != self.global_batch_size:
            raise UserError(
                f"training.global_batch_size: the checkpoint's data order is for {saved_g} rows, "
                f"found {self.global_batch_size}; keep {saved_g} to resume, or start a fresh run"
            )
        if int(state.get("seq_len", self.seq_len)) != self.seq_len:
            logger.warning(
                "training.seq_len changed from %s to %s on resume; rows continue at the same "
                "token positions with windows of the new length",
                state["seq_len"],
                self.seq_len,
            )
        positions = {int(j): (int(k), int(offset)) for j, (k, offset) in state["rows"].items()}
        missing = [j for j in self.rows if j not in positions]
        if missing:
            raise UserError(
                f"checkpoint data state: rows {missing[0]}..{missing[-1]} of this rank are missing "
                f"(found {len(positions)} rows); save and load the merged state of all DP ranks"
            )
        for j, row in self._rows.items():
            row.k, row.offset = positions[j]
            row.doc = None
        if hasattr(self._source, "resume"):
            self._resume_stream(state.get("streams") or {})

    def _resume_stream(self, streams: dict[str, Any]) -> None:
        """Continue this rank's stream where the checkpoint left it.

        The same data-parallel degree continues exactly. Under another degree a stream read whole by
        every rank continues from the latest saved position its rows allow; a stream split by shard
        starts each rank's new shards from their beginning (logged: the order changes).
        """
        saved = streams.get(str(self.dp_rank))
        source = self._source
        if saved is not None and (saved["dp_degree"], saved["per_rank"]) == (
            self.dp_degree,
            self._per_rank,
        ):
            source.resume(saved)
            return
        if self._per_rank or any(p.get("per_rank") for p in streams.values()):
            degrees = sorted({p["dp_degree"] for p in streams.values()})
            logger.warning(
                "training data: the stream was split over %s data-parallel rank(s) when saved and "
                "over %d now, so each rank reads its new shards from their start (a deterministic "
                "but different order; documents already trained on come again); resume with the "
                "saved degree to continue the same order",
                ", ".join(map(str, degrees)) or "an unknown number of",
                self.dp_degree,
            )
            for row in self._rows.values():
                row.k, row.offset, row.doc = 0, 0, None
            return
        oldest = self._oldest_document()
        usable = [p for p in streams.values() if int(p["index"]) <= oldest]
        if usable:  # every rank read the same whole stream: any position before ours will do
            source.resume(max(usable, key=lambda p: int(p["index"])))

    def _window(self, j: int) -> list[int]:
        """Cut the next ``seq_len + 1`` tokens from row ``j``'s token stream."""
        row = self._rows[j]
        window: list[int] = []
        need = self.seq_len + 1
        while need > 0:
            if row.doc is None:
                text = self._source.get(self._document(j, row.k))
                row.doc = DocumentTokens(text, self._tokenizer)
            piece = row.doc.take(row.offset, need)
            if not piece:
                # Only a resumed state can point past a document's end.
                raise UserError(
                    f"checkpoint data state: row {j} resumes at token {row.offset}, past the end "
                    "of its document; the dataset or tokenizer changed since the checkpoint, so "
                    "resume with the original ones or start a fresh run"
                )
            window += piece
            need -= len(piece)
            row.offset += len(piece)
            if row.doc.ends_at(row.offset):
                row.k, row.offset, row.doc = row.k + 1, 0, None
        return window


def check_streaming_keys(t: Any) -> None:
    """The ``[training]`` keys that apply to streams only are set for a stream."""
    if t.dataset_streaming and not t.dataset_path:
        raise UserError(
            "training.dataset_streaming: streams training.dataset_path, which is not set "
            "(hub datasets always stream, the embedded corpus never does); set the path or "
            "drop the flag"
        )
    stream = t.dataset_streaming if t.dataset_path else t.dataset not in EMBEDDED_NAMES
    if t.shuffle_buffer > 1 and not stream:
        raise UserError(
            f"training.shuffle_buffer: {t.shuffle_buffer} shuffles streams, but this data is "
            "read with random access and already shuffled every epoch; drop the key, or set "
            "training.dataset_streaming to stream training.dataset_path"
        )


def _check_layout(seq_len: int, global_batch: int, local_batch: int, dp_degree: int) -> int:
    """Return the gradient accumulation steps, ``G / (D * b)``, after checking the sizes."""
    for field, value in (
        ("training.seq_len", seq_len),
        ("training.global_batch_size", global_batch),
        ("training.local_batch_size", local_batch),
    ):
        if value < 1:
            raise UserError(f"{field}: expected a positive integer, found {value}; set it to >= 1")
    if dp_degree < 1:
        raise ValueError(f"dp_degree must be >= 1, found {dp_degree}")
    per_step = local_batch * dp_degree
    if global_batch % per_step != 0:
        suggestion = max(per_step, round(global_batch / per_step) * per_step)
        raise UserError(
            f"training.global_batch_size: {global_batch} is not a multiple of "
            f"training.local_batch_size ({local_batch}) x data-parallel degree ({dp_degree}) "
            f"= {per_step}; set it to a multiple of {per_step} (e.g. {suggestion}) "
            "or change training.local_batch_size"
        )
    return global_batch // per_step

"""Batches prepared ahead: tokenization and packing run in a background thread during the step.

The loader is deterministic and only the background thread touches it once it has started, so the
batches are the same as without prefetching. Each batch travels with the loader's state right
after it, and :meth:`Prefetcher.state_dict` returns the state after the last batch the training
loop took: a checkpoint resumes at the next batch to train on, not the next one prepared.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from typing import Any

from titan_core.data.loader import GlobalBatchLoader, Microbatch


class Prefetcher:
    """Serves ``loader``'s batches, preparing up to ``depth`` of them ahead in a thread.

    Attributes:
        grad_accum_steps: the loader's microbatches per step.
        wait_seconds: time ``next_batch`` spent waiting for a batch since the last
            :meth:`take_wait` (with ``depth`` 0: the time spent preparing it).
    """

    def __init__(self, loader: GlobalBatchLoader, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.loader = loader
        self.depth = depth
        self.grad_accum_steps = loader.grad_accum_steps
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state: dict[str, Any] | None = None  # the loader's state after the last batch taken

    def next_batch(self) -> list[Microbatch]:
        """The next batch (see :meth:`GlobalBatchLoader.next_batch`)."""
        start = time.perf_counter()
        if self.depth == 0:
            batch = self.loader.next_batch()
        else:
            if self._thread is None:
                self._start()
            item = self._queue.get()
            if isinstance(item, BaseException):  # the data failed in the thread: fail here
                raise item
            batch, self._state = item
        self.wait_seconds += time.perf_counter() - start
        return batch

    def take_wait(self) -> float:
        """The waiting time since the last call, and start counting again."""
        wait, self.wait_seconds = self.wait_seconds, 0.0
        return wait

    def state_dict(self) -> dict[str, Any]:
        """The loader's state after the last batch the training loop took (a copy: callers
        such as the checkpoint's merge of all ranks' rows change it)."""
        return self.loader.state_dict() if self._state is None else copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load_state_dict after batches were prepared ahead")
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _start(self) -> None:
        self._state = self.loader.state_dict()
        self._thread = threading.Thread(target=self._produce, name="titan-data", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = (self.loader.next_batch(), self.loader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # handed to the training thread
            self._queue.put(err)

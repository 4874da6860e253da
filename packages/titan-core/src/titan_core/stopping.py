"""Ending a run early, on purpose and cleanly.

- SIGTERM (what SLURM sends before it kills a job) and SIGINT (Ctrl-C) ask the run to stop after
  the current step: it saves a checkpoint (when checkpointing is on), logs one line and exits with
  ``128 + signal``. Under torchrun every rank stops after the same step, since the ranks agree on
  the signal once per step. A second signal stops at once, as the default handler would.
- A non-finite loss or gradient norm stops the run before the optimizer applies it, so the weights
  and every checkpoint stay finite, unless ``training.skip_nonfinite_steps`` skips that update.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from titan_core.errors import RunStopped

logger = logging.getLogger("titan")

EXIT_NONFINITE = 3


class StopSignals:
    """While active, SIGTERM and SIGINT only set :attr:`received`; the loop polls :meth:`agreed`."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:  # a second signal: the user means now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.info(
            "received %s: stopping after this step (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none): every rank stops after the same step."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        flag = torch.tensor(self.received, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def stopped_by_signal(signum: int, step: int, saved: str | None) -> RunStopped:
    """The exception that ends a run stopped by ``signum`` after ``step``."""
    name = signal.Signals(signum).name
    if saved:
        what = f"checkpoint {saved} saved; rerun the same command to resume from it"
    else:
        what = "checkpointing is off, so nothing was saved (--checkpoint.enable to save on stop)"
    return RunStopped(f"stopped by {name} after step {step}: {what}", 128 + signum)


def finite_step(step: int, loss: float, grad_norm: float, skip: bool) -> bool:
    """Whether step ``step``'s update may be applied; a non-finite one stops the run or is skipped.

    Args:
        step: the step being taken.
        loss: its global mean loss.
        grad_norm: its global gradient norm (before clipping).
        skip: ``training.skip_nonfinite_steps``: skip the update with a warning instead of stopping.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return True
    what = f"step {step}: the loss is {loss} and the gradient norm {grad_norm}"
    if skip:
        logger.warning("%s; the update is skipped (training.skip_nonfinite_steps)", what)
        return False
    raise RunStopped(
        f"{what}; stopped before applying it, so the weights and checkpoints stay finite (a "
        "rerun resumes from the last checkpoint); lower optimizer.lr, raise lr_scheduler."
        "warmup_steps or set training.skip_nonfinite_steps",
        EXIT_NONFINITE,
    )

"""Reading rows through `datasets`: its logging silenced, text checks and one-line messages."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

# A stream cannot be scanned before training: this many rows without text at its start refuse it.
TEXT_CHECK_ROWS = 1000


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
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


def is_blank(text: str) -> bool:
    return not text or text.isspace()


def no_text(name: str, rows: int, whole: bool) -> str:
    which = f"all {rows} rows" if whole else f"the first {rows} rows"
    return (
        f"{name} holds no text: {which} are empty or whitespace only, so training would see only "
        'document boundary tokens; put the documents in the "text" field or remove the empty rows'
    )


def as_text(value: object) -> str:
    # Null text cells (they occur in scraped corpora) become empty documents rather than crashes.
    return "" if value is None else str(value)


def no_text_column(name: str, columns: list[str]) -> str:
    return (
        f'{name} has no "text" column (found: {", ".join(columns) or "none"}); '
        'rename the column holding the documents to "text"'
    )


def innermost(err: BaseException) -> str:
    # `datasets` wraps the useful message (e.g. pyarrow's parse error) in generic ones.
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

"""Output folders that appear complete or not at all, and a progress bar."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from titan_core.errors import UserError


def check_output(out_dir: Path, source: Path, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that holds something (unless ``overwrite``) or would hold or
    replace the input."""
    out, src = out_dir.resolve(), source.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise UserError(
            f"OUT_DIR {out_dir} would replace the input {source} or be written inside it; "
            "pick another folder"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"OUT_DIR {out_dir} is a file; pick a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"OUT_DIR {out_dir} exists and is not empty; pass --overwrite to replace it or "
            "pick another folder"
        )


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A temporary folder next to ``out_dir``, renamed to ``out_dir`` when the block ends.

    If the block fails (or is interrupted) the temporary folder is removed and ``out_dir`` is
    left as it was; on success an existing ``out_dir`` is replaced.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        temp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(out_dir)


class Progress:
    """Bytes done of ``total``: a tqdm bar on a terminal, else nothing (logs stay clean).

    Args:
        total: bytes to process.
        desc: the label in front of the bar.
    """

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.total, self.done, self.desc = total, 0, desc
        self._bar = None
        if tqdm is not None:
            kind = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, **kind)
        self._plain = tqdm is None and sys.stderr.isatty()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        elif self._plain:
            print(f"\r{self.desc}: {self.done / 2**20:,.0f} / {self.total / 2**20:,.0f} MiB",
                  end="", file=sys.stderr)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            print(file=sys.stderr)

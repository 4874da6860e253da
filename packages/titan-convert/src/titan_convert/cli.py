"""``titan-convert``: titan DCP checkpoints <-> Hugging Face safetensors folders.

Bad input exits with code 2 and one line on stderr (nothing is written); set ``TITAN_DEBUG=1``
for the traceback. ``verify`` exits 1 when the logits differ by more than the tolerance. Ctrl-C
exits 130 with one line; the output folder is left as it was (conversions write to a temporary
folder next to it, removed on the way out).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from titan_core.errors import UserError, report_user_error

DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titan-convert",
        description="Convert between titan DCP checkpoints and Hugging Face safetensors folders.",
    )
    parser.add_argument(
        "--version", action="version", version=f"titan-convert {version('titan-convert')}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    to_dcp = commands.add_parser("hf-to-dcp", help="HF folder -> titan checkpoint folder")
    to_dcp.add_argument("hf_dir", metavar="HF_DIR", type=Path)
    to_dcp.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    to_dcp.add_argument(
        "--model.name",
        dest="model_name",
        default=None,
        help="titan model family (default: the one claiming config.json's model_type)",
    )
    to_dcp.add_argument("--dtype", choices=DTYPES, default="float32", help="stored dtype")
    to_dcp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    to_hf = commands.add_parser("dcp-to-hf", help="titan checkpoint -> HF folder")
    to_hf.add_argument("ckpt_dir", metavar="CKPT_DIR", type=Path)
    to_hf.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    to_hf.add_argument(
        "--export-dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the safetensors weights (float32 keeps the checkpoint's bits)",
    )
    to_hf.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    to_hf.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MiB)"
    )

    verify = commands.add_parser(
        "verify", help="logits of titan vs transformers on the same weights (needs transformers)"
    )
    verify.add_argument("hf_dir", metavar="HF_DIR", type=Path)
    verify.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest accepted max-abs logit difference, relative to the largest logit",
    )
    return parser


def run(opts: argparse.Namespace) -> int:
    """Run the command ``opts`` (parsed by :func:`_parser`); returns the exit code."""
    import torch

    if opts.command == "hf-to-dcp":
        from titan_convert.hf_to_dcp import hf_to_dcp

        out = hf_to_dcp(
            opts.hf_dir, opts.out_dir, opts.model_name, getattr(torch, opts.dtype), opts.overwrite
        )
        print(f"titan-convert: wrote the titan checkpoint {out}")
    elif opts.command == "dcp-to-hf":
        from titan_convert.dcp_to_hf import dcp_to_hf, parse_size

        out = dcp_to_hf(
            opts.ckpt_dir,
            opts.out_dir,
            getattr(torch, opts.export_dtype),
            opts.overwrite,
            parse_size(opts.max_shard_size),
        )
        print(f"titan-convert: wrote the Hugging Face folder {out}")
    else:
        from titan_convert.verify import logit_difference

        diff, relative = logit_difference(opts.hf_dir)
        verdict = "OK" if relative <= opts.tolerance else "FAILED"
        print(
            f"titan-convert verify: max abs logit difference {diff:.3g}, relative {relative:.3g} "
            f"(tolerance {opts.tolerance:g}): {verdict}"
        )
        return 0 if verdict == "OK" else 1
    return 0


@contextlib.contextmanager
def _noting_ctrl_c() -> Iterator[list[int]]:
    """Ctrl-C still raises KeyboardInterrupt, and is noted in the list yielded.

    NOTE: DCP wraps any exception of a save, KeyboardInterrupt included, in a
    CheckpointException, so the exception alone cannot tell an interrupt from a failure.
    """
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted  # signal handlers belong to the main thread
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if noted:
            return  # a second Ctrl-C must not stop the temporary folder's removal
        noted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = _parser().parse_args(argv)
    with _noting_ctrl_c() as ctrl_c:
        try:
            return run(opts)
        except UserError as e:
            return report_user_error("titan-convert", e)
        except BaseException as e:
            if not (ctrl_c or isinstance(e, KeyboardInterrupt)):
                raise
            out = getattr(opts, "out_dir", None)
            written = f"; nothing was written to {out}" if out is not None else ""
            print(f"titan-convert: interrupted{written}", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())

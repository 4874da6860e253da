"""``titan-eval MODEL``: perplexity on texts, or lm-eval tasks, for a checkpoint or HF folder.

::

    titan-eval MODEL --text-file book.txt                   # the file is one document
    titan-eval MODEL --dataset c4_test --max-documents 200  # titan's data sources
    titan-eval MODEL --tasks hellaswag,arc_easy --limit 100 # lm-evaluation-harness

Results go to stdout (``--json``: one JSON object); progress and loading notes go to stderr.
Bad input exits with code 2 and one line on stderr, before the model is loaded where it can be
told without it; ``TITAN_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import re
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from titan_core.errors import UserError, report_user_error
from titan_core.evaluate import (
    LM_EVAL_MISSING,
    Progress,
    load_for_eval,
    perplexity,
    resolve_device,
)

_SECTION = "TITAN_EVAL_SECTION"  # stands for the flag in the data sources' error messages
_LM_EVAL_ONLY = ("include_path", "limit", "num_fewshot")
_PERPLEXITY_ONLY = ("stride", "max_documents")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titan-eval",
        description="Perplexity of a model on texts, or lm-eval tasks (docs/evaluation.md).",
    )
    parser.add_argument(
        "--version", action="version", version=f"titan-eval {version('titan-core')}"
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        type=Path,
        help="a titan checkpoint (step-N, checkpoint or dump folder) or a Hugging Face folder",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--text-file", action="append", type=Path, help="a UTF-8 text, one document; repeatable"
    )
    what.add_argument(
        "--dataset",
        help="documents as training reads them: a .jsonl/.parquet/.txt file or folder, "
        "c4_test (the embedded corpus), or a hub dataset name",
    )
    what.add_argument("--tasks", help="lm-eval task names (comma-separated) or task YAML files")
    parser.add_argument("--lm-eval", action="store_true", help="say --tasks is lm-eval's (default)")
    parser.add_argument("--max-documents", type=int, help="read at most N documents of --dataset")
    parser.add_argument(
        "--max-length", type=int, help="positions per window (default: the model's)"
    )
    parser.add_argument("--stride", type=int, help="overlapping windows: new tokens per window")
    parser.add_argument("--batch-size", type=int, default=1, help="windows/requests per forward")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--include-path", action="append", type=Path, help="folder of task YAMLs")
    parser.add_argument("--limit", type=float, help="documents per task (below 1: a fraction)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt")
    return parser


def _check_flags(opts: argparse.Namespace) -> None:
    """Flags that belong to the other mode, and numbers out of range: one line each."""
    mode_flags = _PERPLEXITY_ONLY if opts.tasks else (*_LM_EVAL_ONLY, "lm_eval")
    for name in mode_flags:
        if getattr(opts, name) not in (None, False):
            needs = "perplexity (--text-file or --dataset)" if opts.tasks else "--tasks"
            raise UserError(f"--{name.replace('_', '-')}: only used with {needs}")
    if opts.max_documents is not None and opts.text_file:
        raise UserError("--max-documents: only used with --dataset")
    for name in ("batch_size", "max_documents", "max_length", "stride"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')}={value}: must be at least 1")
    if not opts.model.exists():
        raise UserError(f"MODEL: {opts.model} does not exist; pass a checkpoint or an HF folder")


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--text-file: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text-file: {path} cannot be read as UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"--text-file: {path} holds no text; pass a file with text in it")
    return text


def _dataset_texts(dataset: str, max_documents: int | None) -> Iterator[str]:
    """One pass over a dataset's documents (the first ``max_documents``); opened at once."""
    from titan_core.data.sources import EMBEDDED_NAMES, open_documents

    local = Path(dataset).exists() or Path(dataset).suffix in _LOCAL_SUFFIXES
    if not local and dataset not in EMBEDDED_NAMES and max_documents is None:
        raise UserError(
            f"--dataset: {dataset} streams from the hub, where one pass may be endless; "
            "add --max-documents N"
        )
    try:
        source = open_documents(
            "" if local else dataset, dataset if local else "", seed=0, section=_SECTION
        )
    except UserError as e:
        # NOTE: the sources name the config fields (training.dataset_path ...); this names the flag
        raise UserError(re.sub(rf"(--)?{_SECTION}\.dataset(_path)?", "--dataset", str(e))) from None

    def texts() -> Iterator[str]:
        for index in range(max_documents) if max_documents else itertools.count():
            text = source.get(index)
            if source.pass_length is not None and index >= source.pass_length:
                return  # past one pass (a map source's next epoch, or a stream that wrapped)
            yield text

    return texts()


def _report_progress(running: Any) -> None:
    print(
        f"titan-eval: {running.documents:,} documents, {running.tokens:,} tokens, "
        f"loss {running.loss:.4f}",
        file=sys.stderr,
        flush=True,
    )


def run_perplexity(opts: argparse.Namespace) -> dict[str, Any]:
    """Perplexity on ``--text-file`` or ``--dataset``; the result as a JSON-able dict."""
    if opts.text_file:
        texts: Any = [_read_text(path) for path in opts.text_file]
    else:
        texts = _dataset_texts(opts.dataset, opts.max_documents)
    device, dtype = resolve_device(opts.device, opts.dtype)
    model, tokenizer = load_for_eval(opts.model, device, dtype)
    result = perplexity(
        model,
        tokenizer,
        texts,
        max_length=opts.max_length,
        stride=opts.stride,
        batch_size=opts.batch_size,
        progress=Progress(_report_progress),
    )
    if result.tokens == 0:
        raise UserError(f"--dataset: {opts.dataset} yielded no documents")
    return {"model": str(opts.model), **vars(result)}


def _task_manager(opts: argparse.Namespace) -> tuple[Any, list[str]]:
    """lm-eval's task index and the task names, each checked; one line if lm-eval is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"--tasks: {LM_EVAL_MISSING}")
    from lm_eval.tasks import TaskManager

    for folder in opts.include_path or []:
        if not folder.is_dir():
            raise UserError(f"--include-path: {folder} is not a folder of task YAML files")
    names = [name.strip() for name in opts.tasks.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks: name at least one lm-eval task")
    include = [str(folder) for folder in opts.include_path or []] or None
    # NOTE: indexing lm-eval's own tasks takes seconds; tasks all found locally do without them
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not all(_known(manager, name) for name in names):
        manager = TaskManager(include_path=include)
    unknown = [name for name in names if not _known(manager, name)]
    if unknown:
        raise UserError(
            f"--tasks: {unknown[0]} is not an lm-eval task or task YAML file; `lm-eval ls tasks` "
            "lists them, and --include-path DIR adds a folder of your own"
        )
    return manager, names


def _known(manager: Any, name: str) -> bool:
    return name in manager.all_tasks or Path(name).is_file()


def run_lm_eval(opts: argparse.Namespace) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on the titan adapter; lm-eval's results dict."""
    manager, names = _task_manager(opts)
    if opts.limit is not None and opts.limit <= 0:
        raise UserError(f"--limit={opts.limit}: must be above 0")
    import lm_eval

    from titan_core.lm_eval_adapter import TitanLM

    resolve_device(opts.device, opts.dtype)  # the adapter falls back to cpu; titan-eval refuses

    model = TitanLM(
        pretrained=str(opts.model),
        device=opts.device,
        dtype=opts.dtype,
        batch_size=opts.batch_size,
        max_length=opts.max_length,
    )
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit
    # NOTE: lm-eval prints notes of its own (bootstrapping ...); stdout holds only the results
    with contextlib.redirect_stdout(sys.stderr):
        return lm_eval.simple_evaluate(
            model=model,
            tasks=names,
            task_manager=manager,
            num_fewshot=opts.num_fewshot,
            limit=limit,
            log_samples=False,
        )


def _print(opts: argparse.Namespace, result: dict[str, Any]) -> None:
    if opts.tasks:
        if opts.json:
            keep = ("results", "groups", "n-shot", "versions")
            print(json.dumps({k: result[k] for k in keep if k in result}, default=str))
        else:
            from lm_eval.utils import make_table

            print(make_table(result))
        return
    if opts.json:
        print(json.dumps(result))
    else:
        print(
            f"perplexity {result['perplexity']:.4f}  loss {result['loss']:.6f}  "
            f"tokens {result['tokens']:,}  documents {result['documents']:,}"
        )


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _check_flags(opts)
        result = run_lm_eval(opts) if opts.tasks else run_perplexity(opts)
    except UserError as e:
        return report_user_error("titan-eval", e)
    _print(opts, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

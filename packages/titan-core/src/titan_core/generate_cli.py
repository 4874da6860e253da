"""``titan-generate MODEL --prompt TEXT``: continue text with a titan checkpoint or HF folder.

Only the completions go to stdout (one per prompt, each followed by a newline); loading notes
go to stderr. Bad input exits with code 2 and one line on stderr; ``TITAN_DEBUG=1`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from titan_core.errors import UserError, report_user_error

DTYPES = ("float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="titan-generate",
        description="Continue prompts with a trained model (greedy unless --temperature > 0).",
    )
    parser.add_argument(
        "--version", action="version", version=f"titan-generate {version('titan-core')}"
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        type=Path,
        help="a titan checkpoint (step-N, checkpoint or dump folder) or a Hugging Face folder",
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="text to continue; repeat for a batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens added")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present, else cpu)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="weights (default: float32 on CPU, else bf16)"
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute every position (slow; for checks)"
    )
    return parser


def _device_and_dtype(opts: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={opts.device}: no CUDA device here; use --device cpu")
    dtype = opts.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    return device, getattr(torch, dtype)


def generation_eos_ids(model_path: Path) -> set[int]:
    """EOS ids a Hugging Face folder's ``generation_config.json`` names (an int or a list),
    read as JSON only; none for a folder without one."""
    path = model_path / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{path}: not a JSON object ({e}); fix or delete the file") from None
    values = value if isinstance(value, list) else [value]
    return {v for v in values if isinstance(v, int)}


def run(opts: argparse.Namespace) -> list[str]:
    """Load, encode, generate, decode; returns the completions."""
    from titan_core.generate import check_sampling, generate

    check_sampling(opts.max_new_tokens, opts.temperature, opts.top_k, opts.top_p)
    if not opts.model.exists():
        raise UserError(f"MODEL: {opts.model} does not exist; pass a checkpoint or an HF folder")
    import torch

    device, dtype = _device_and_dtype(opts)
    from titan_core.pretrained import load_pretrained, load_pretrained_tokenizer

    tokenizer = load_pretrained_tokenizer(opts.model)  # before the weights: cheap to refuse
    prompts = [tokenizer.encode_prompt(text) for text in opts.prompt]
    model = load_pretrained(opts.model, device)
    if dtype != torch.float32:
        model.to(dtype)
        model.rope.float().reset_parameters()  # the RoPE tables stay float32, as in training
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(
            f"MODEL: {opts.model}'s tokenizer has {tokenizer.vocab_size} ids but the model "
            f"{model.args.vocab_size}; the tokenizer is not the one the model was trained with"
        )
    eos = {tokenizer.eos_id} | generation_eos_ids(opts.model)
    outputs = generate(
        model,
        prompts,
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_k=opts.top_k,
        top_p=opts.top_p,
        seed=opts.seed,
        eos_ids=eos,
        use_cache=not opts.no_cache,
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        completions = run(opts)
    except UserError as e:
        return report_user_error("titan-generate", e)
    for text in completions:
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

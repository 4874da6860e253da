"""lm-evaluation-harness adapter: ``--model titan`` evaluates a titan checkpoint or HF folder.

Importing this module registers :class:`TitanLM` with lm-eval as ``titan``. lm-eval finds models
only in its own registry (it reads no entry points), so its command line needs the module
imported first; ``python -m titan_core.lm_eval_adapter`` is lm-eval's own command line with it
imported::

    python -m titan_core.lm_eval_adapter run --model titan --model_args pretrained=outputs \\
        --tasks hellaswag --batch_size 8

``titan-eval MODEL --tasks ...`` (:mod:`titan_core.evaluate_cli`) runs the same adapter.

Requests are tokenized, truncated and scored as lm-eval's own Hugging Face backend (``hf``)
does, so a titan checkpoint and its Hugging Face export get the same numbers:

* text is encoded as ``AutoTokenizer`` encodes it (the tokenizer's post-processor adds BOS),
  unless it already starts with the BOS text;
* a context and continuation longer than the window lose tokens from the left;
* ``loglikelihood_rolling`` scores lm-eval's rolling windows, BOS (else EOS) as prefix;
* ``generate_until`` decodes greedily unless the task samples, stops a row at an EOS id (the
  tokenizer's and the model folder's ``generation_config.json``'s) and cuts the text at the first
  ``until`` string.

lm-eval is an optional dependency (``pip install lm-eval`` or ``pip install 'titan-core[eval]'``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from titan_core.errors import UserError
from titan_core.evaluate import LM_EVAL_MISSING, load_for_eval, resolve_device
from titan_core.generate import generate, positions_of

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm
except ImportError as e:
    raise ImportError(f"titan_core.lm_eval_adapter: {LM_EVAL_MISSING}") from e

logger = logging.getLogger("titan")

NAME = "titan"
# (context, continuation) strings, context ids, continuation ids: lm-eval's scoring request.
Request = tuple[tuple[str, str] | None, list[int], list[int]]
_SAMPLING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _batch_size(value: Any) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise UserError(f"batch_size={value}: the titan model needs a number of at least 1")
    return size


class TitanLM(TemplateLM):
    """An lm-eval model over :func:`titan_core.pretrained.load_pretrained`.

    Args:
        pretrained: a titan checkpoint (``step-N``, checkpoint or dump folder) or an HF folder.
        device: ``cpu``, ``cuda``, ``cuda:1`` ... (default: cuda if present, else cpu).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: float32 on CPU, else bf16).
        batch_size: requests scored per forward pass.
        max_length: the most positions a request is given (default: the model's positions).
        max_gen_toks: ``generate_until``'s token budget when a task sets none.
        max_batch_size: accepted for lm-eval's command line; unused.
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise UserError(
                f"model_args {', '.join(sorted(unknown))}: not known to the titan model; it takes "
                "pretrained, device, dtype, batch_size, max_length, max_gen_toks"
            )
        self._batch_size = _batch_size(batch_size)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # NOTE: as the hf backend does: lm-eval's command line asks for cuda:0 by default
            logger.warning("titan: device=%s asked, but there is no CUDA device; using cpu", device)
            device = "cpu"
        self._device, weights = resolve_device(device, dtype)
        self.pretrained = str(pretrained)
        self.model, self.tokenizer = load_for_eval(pretrained, self._device, weights)
        positions = positions_of(self.model)
        self._max_length = int(max_length) if max_length else positions
        if not 1 <= self._max_length <= positions:
            raise UserError(
                f"max_length={max_length}: must be between 1 and the model's {positions} positions"
            )
        self._max_gen_toks = int(max_gen_toks)
        self._eos_ids = {self.tokenizer.eos_id}
        for folder in (Path(pretrained), self.tokenizer.folder):  # HF folder; checkpoint copy
            self._eos_ids |= _generation_eos_ids(folder)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # NOTE: as the hf backend: BOS, else EOS (titan's bos_id is the EOS when there is no BOS)
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """The ids of ``string``: with the post-processor's special tokens (as ``AutoTokenizer``
        encodes) unless ``add_special_tokens`` is False or the text starts with the BOS text."""
        if add_special_tokens is None:
            bos = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not (bos and string.startswith(bos))
        if add_special_tokens:
            return self.tokenizer.encode_prompt(string)
        return self.tokenizer.encode(string)

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request;
        batches of similar length, longest first."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="titan loglikelihood")
        for chunk in _chunks(order, self.batch_size):
            rows = [self._window(requests[i][1], requests[i][2]) for i in chunk]
            for i, answer in zip(chunk, self._score(rows), strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(inputs, continuation): inputs are the last ``max_length`` ids before the last one."""
        if len(continuation) > self.max_length:
            raise UserError(
                f"a continuation of {len(continuation)} tokens does not fit the model's "
                f"max_length of {self.max_length}"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1], continuation

    @torch.inference_mode()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inputs) for inputs, _ in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)  # right-padded: attention is causal
        for row, (inputs, _) in enumerate(rows):
            batch[row, : len(inputs)] = torch.tensor(inputs)
        logprobs = F.log_softmax(self.model(batch.to(self.device)).float(), dim=-1)  # (B, W, V)
        answers = []
        for row, (inputs, continuation) in enumerate(rows):
            n, k = len(inputs), len(continuation)
            picked = logprobs[row, n - k : n]  # (k, V): the positions that predict the continuation
            wanted = torch.tensor(continuation, device=picked.device)
            total = picked.gather(-1, wanted[:, None]).double().sum()
            answers.append((float(total), bool((picked.argmax(-1) == wanted).all())))
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in lm-eval's rolling windows (each token scored once)."""
        windows: list[Request] = []
        owners: list[int] = []
        for n, request in enumerate(requests):
            (text,) = request.args
            pairs = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores, strict=True):
            totals[n] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first ``until`` string; requests with the
        same generation settings are batched, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="titan generate_until")
        for members in groups.values():
            settings = self._generation_settings(requests[members[0]].args[1])
            until, max_new = settings.pop("until"), settings.pop("max_new_tokens")
            prompts = {i: self._prompt(requests[i].args[0], max_new) for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for chunk in _chunks(order, self.batch_size):
                outputs = generate(
                    self.model,
                    [prompts[i] for i in chunk],
                    max_new_tokens=max_new,
                    eos_ids=self._eos_ids,
                    **settings,
                )
                for i, ids in zip(chunk, outputs, strict=True):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        """``generate``'s keyword arguments for a task's ``generation_kwargs``, plus ``until``."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.get("until"), eos=eos_text)
        max_new = int(kwargs["max_gen_toks"])
        if max_new >= self.max_length:
            raise UserError(
                f"max_gen_toks={max_new}: must be below the model's max_length ({self.max_length})"
            )
        ignored = sorted(set(kwargs) - _SAMPLING_KEYS)
        if ignored:
            logger.warning("titan: generation settings %s are not supported; ignored", ignored)
        settings: dict[str, Any] = {"until": until, "max_new_tokens": max_new}
        temperature = float(kwargs.get("temperature") or 0.0)
        if kwargs.get("do_sample") and temperature > 0:
            settings["temperature"] = temperature
            settings["top_k"] = kwargs.get("top_k")
            settings["top_p"] = kwargs.get("top_p")
            # NOTE: drawn from torch's generator, so lm-eval's --seed makes sampling repeatable
            settings["seed"] = int(torch.randint(2**62, ()))
        return settings

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, left-truncated to leave room for ``max_new`` new tokens."""
        ids = self.tok_encode(context)[-(self.max_length - max_new) :]
        return ids or [self.prefix_token_id]


def _generation_eos_ids(folder: Path | None) -> set[int]:
    """The EOS ids of a folder's ``generation_config.json`` (transformers stops on them)."""
    from titan_core.generate_cli import generation_eos_ids

    return generation_eos_ids(folder) if folder is not None and folder.is_dir() else set()


def register() -> None:
    """Make ``--model titan`` known to lm-eval (idempotent)."""
    import lm_eval.models  # noqa: F401  (lm-eval's own names first: it adds them to an empty registry only)

    if NAME not in model_registry:
        model_registry.register(NAME, target="titan_core.lm_eval_adapter:TitanLM")


register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (``lm-eval run ...``), with ``--model titan`` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()

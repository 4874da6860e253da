"""Perplexity of a trained model on texts, and loading a model for evaluation.

Each document is tokenized as training reads it, ``[bos] + encode(text) + [eos]``, and scored on
its own (no context crosses a document boundary). The BOS is context only; every other token,
the EOS included, is predicted once. A document longer than the window is scored in windows of at
most ``max_length`` positions:

* ``stride == max_length`` (the default): windows that do not overlap; each token is scored
  with the tokens since its window's start as context.
* ``stride < max_length``: each window after the first moves ``stride`` tokens on and scores only
  those ``stride`` new tokens, with the ``max_length - stride`` before them as context (more
  context per token, more compute).

The last window of a long document is filled up with earlier tokens as context (only its new
tokens are scored), as lm-eval's rolling windows are. Every token is scored exactly once.

The result is ``sum(token losses) / tokens`` (the sum in float64) and its exponential.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from titan_core.data.tokenizer import DocumentTokens, Tokenizer
from titan_core.errors import UserError
from titan_core.generate import positions_of

IGNORE_INDEX = -100  # labels torch's cross_entropy skips: context and padding

DTYPES = ("float32", "bfloat16", "float16")
LM_EVAL_MISSING = (
    "lm-eval is not installed; pip install lm-eval (or pip install 'titan-core[eval]')"
)


@dataclass(frozen=True)
class Perplexity:
    """The score of a model on a set of documents.

    Attributes:
        loss: mean negative log-likelihood per scored token, in nats.
        perplexity: ``exp(loss)``.
        tokens: tokens scored (each document's tokens after its BOS, its EOS included).
        documents: documents read.
    """

    loss: float
    perplexity: float
    tokens: int
    documents: int


@dataclass
class _Totals:
    loss_sum: float = 0.0  # float64: a Python float
    tokens: int = 0
    documents: int = 0

    def result(self) -> Perplexity:
        loss = self.loss_sum / self.tokens if self.tokens else float("nan")
        return Perplexity(
            loss=loss,
            perplexity=float(torch.tensor(loss, dtype=torch.float64).exp()),
            tokens=self.tokens,
            documents=self.documents,
        )


def document_windows(
    tokens: DocumentTokens, max_length: int, stride: int
) -> Iterator[tuple[list[int], int]]:
    """The windows one document is scored in.

    Args:
        tokens: the document's tokens, ``[bos] + encode(text) + [eos]``.
        max_length: the most input positions of a window.
        stride: how far each window after the first moves on (at most ``max_length``).

    Yields:
        ``(ids, scored)``: the model reads ``ids[:-1]`` and predicts ``ids[1:]``, of which only
        the last ``scored`` count.
    """
    end = 0  # the tokens [1, end] are scored; token 0 (BOS) is context only
    while True:
        target = end + (max_length if end == 0 else stride)
        # NOTE: from the earliest start the last window could need: where the document ends
        # is known only once its tokens are read, and that window takes a full context.
        base = max(0, end + 1 - max_length)
        ids = tokens.take(base, target + 1 - base)
        last = base + len(ids) - 1  # the last token this window predicts
        if last <= end:
            return
        start = max(0, last - max_length)
        yield ids[start - base :], last - end
        end = last
        if last < target:  # the document ended inside this window
            return


def _batch_tensors(batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) inputs right-padded with id 0 and (B, W) labels, IGNORE_INDEX where not scored."""
    width = max(len(ids) for ids, _ in batch) - 1
    inputs = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, scored) in enumerate(batch):
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        labels[row, n - scored : n] = torch.tensor(ids[n + 1 - scored :])
    return inputs, labels


@torch.inference_mode()
def score_windows(model: nn.Module, batch: list[tuple[list[int], int]]) -> tuple[float, int]:
    """Sum of the scored tokens' losses (float64) and their count, for one batch of windows.

    Args:
        model: a titan model (``model(tokens) -> logits``).
        batch: ``(ids, scored)`` windows as :func:`document_windows` yields them.
    """
    device = next(model.parameters()).device
    inputs, labels = (t.to(device) for t in _batch_tensors(batch))
    logits = model(inputs)  # (B, W, V)
    # NOTE: causal attention: right padding cannot change the logits of the real positions.
    losses = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B * W,), 0 where ignored
    return float(losses.double().sum()), int((labels != IGNORE_INDEX).sum())


def perplexity(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Iterable[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    progress: Callable[[Perplexity], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``texts``, each scored on its own (see the module docstring).

    Args:
        model: a titan model in eval mode (``load_pretrained``).
        tokenizer: the tokenizer the model was trained with.
        texts: the documents.
        max_length: the most positions of a window; default (and at most) the model's positions.
        stride: how far each window after a document's first moves on; default ``max_length``
            (non-overlapping windows).
        batch_size: windows scored per forward pass.
        progress: called with the running result after every batch.

    Raises:
        UserError: ``max_length``, ``stride`` or ``batch_size`` out of range.
    """
    max_length, stride = check_windows(model, max_length, stride, batch_size)
    totals, batch = _Totals(), []

    def flush() -> None:
        loss_sum, count = score_windows(model, batch)
        totals.loss_sum += loss_sum
        totals.tokens += count
        batch.clear()
        if progress is not None:
            progress(totals.result())

    for text in texts:
        totals.documents += 1
        for window in document_windows(DocumentTokens(text, tokenizer), max_length, stride):
            batch.append(window)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    return totals.result()


def check_windows(
    model: nn.Module, max_length: int | None, stride: int | None, batch_size: int
) -> tuple[int, int]:
    """The window length and stride to use; a UserError naming the flag when out of range."""
    positions = positions_of(model)
    if max_length is None:
        max_length = positions
    if not 1 <= max_length <= positions:
        raise UserError(
            f"--max-length={max_length}: must be between 1 and the model's {positions} positions "
            "(max_position_embeddings)"
        )
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise UserError(f"--stride={stride}: must be between 1 and --max-length ({max_length})")
    if batch_size < 1:
        raise UserError(f"--batch-size={batch_size}: must be at least 1")
    return max_length, stride


def resolve_device(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The device (default cuda if present, else cpu) and weight dtype (default float32 on CPU,
    bfloat16 on GPU) to evaluate with; a UserError naming the flag when unusable."""
    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device={device}: not a device; use cpu, cuda or cuda:N") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device}: no CUDA device here; use --device cpu")
    name = dtype or ("float32" if where.type == "cpu" else "bfloat16")
    if name not in DTYPES:
        raise UserError(f"--dtype={dtype}: must be one of {', '.join(DTYPES)}")
    return where, getattr(torch, name)


def load_for_eval(
    path: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of a titan checkpoint or HF folder, ready to evaluate.

    Args:
        path: what :func:`titan_core.pretrained.load_pretrained` reads.
        device: where the weights go.
        dtype: the weights' dtype; the RoPE tables stay float32, as in training.

    Raises:
        UserError: no model or tokenizer there, or the tokenizer has more ids than the model.
    """
    from titan_core.pretrained import load_pretrained, load_pretrained_tokenizer

    tokenizer = load_pretrained_tokenizer(path)  # before the weights: cheap to refuse
    model = load_pretrained(path, device)
    if dtype != torch.float32:
        model.to(dtype)
        model.rope.float().reset_parameters()
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(
            f"MODEL: {path}'s tokenizer has {tokenizer.vocab_size} ids but the model "
            f"{model.args.vocab_size}; the tokenizer is not the one the model was trained with"
        )
    return model, tokenizer


class Progress:
    """Calls ``report`` with the running result at most every ``every_s`` seconds."""

    def __init__(self, report: Callable[[Perplexity], None], every_s: float = 10.0) -> None:
        self._report = report
        self._every_s = every_s
        self._last = time.monotonic()

    def __call__(self, running: Perplexity) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._report(running)

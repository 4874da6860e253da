"""Validation: the model's loss and perplexity on held-out data, measured during training.

The validation set is read the same way under every layout. Its documents are read in order
(for a map-style source, the seeded order of its first epoch), each as ``[bos] + text + [eos]``,
and concatenated. The token stream is cut into windows of ``seq_len + 1`` tokens, with no overlap
and no padding inside a window. Windows ``[i G, (i + 1) G)`` form validation batch ``i``, where
``G`` is ``validation.local_batch_size`` x the data-parallel degree. DP rank ``r`` of ``D``
evaluates rows ``[r G / D, (r + 1) G / D)`` of each batch.

``validation.steps = -1`` evaluates every window of one pass over the documents. The last batch
is then filled up with rows whose labels are all ignored (-100). The result is the mean loss
over all evaluated tokens: a sum of per-token losses and a token count, summed over the ranks.
So a whole-set validation gives the same number for any layout and any batch size, and a
validation of ``steps`` batches gives the same number for any layout with the same ``G``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from titan_core.data.sources import DocumentSource, open_documents
from titan_core.data.tokenizer import DocumentTokens, Tokenizer
from titan_core.distributed import as_local
from titan_core.errors import UserError
from titan_core.parallel.dims import check_seq_len

logger = logging.getLogger("titan")

IGNORE_INDEX = -100  # label of padding rows; torch's cross_entropy skips it


class ValidationBatches:
    """This DP rank's rows of the validation batches, one pass, from the first document."""

    def __init__(
        self,
        open_source: Callable[[], DocumentSource],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_degree: int,
    ) -> None:
        """Describe the batches; nothing is read until they are iterated.

        Args:
            open_source: opens the validation documents, from the first (called once per pass).
            tokenizer: the training tokenizer.
            seq_len: tokens of input per row.
            local_batch_size: rows per DP rank per batch.
            dp_rank: this rank's index among the data-parallel ranks.
            dp_degree: the number of data-parallel ranks.
        """
        self._open = open_source
        self._tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch_size = local_batch_size * dp_degree
        self.rows = range(dp_rank * local_batch_size, (dp_rank + 1) * local_batch_size)

    def batches(self, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(inputs, labels)``, each ``(local_batch_size, seq_len)`` int64.

        Args:
            max_batches: stop after this many batches; -1: at the end of one pass.
        """
        windows = self._windows()
        done = 0
        while max_batches < 0 or done < max_batches:
            batch = [w for _, w in zip(range(self.global_batch_size), windows, strict=False)]
            if not batch:
                return
            pad = [IGNORE_INDEX] * (self.seq_len + 1)
            rows = [batch[j] if j < len(batch) else pad for j in self.rows]
            tokens = torch.tensor(rows, dtype=torch.int64)
            inputs, labels = tokens[:, :-1].clamp(min=0), tokens[:, 1:].contiguous()
            yield inputs.contiguous(), labels
            done += 1
            if len(batch) < self.global_batch_size:
                return

    def _windows(self) -> Iterator[list[int]]:
        """Consecutive ``seq_len + 1``-token windows of the concatenated documents."""
        need = self.seq_len + 1
        window: list[int] = []
        for text in self._documents():
            doc, offset = DocumentTokens(text, self._tokenizer), 0
            while not doc.ends_at(offset):
                piece = doc.take(offset, need - len(window))
                if not piece:
                    break
                window += piece
                offset += len(piece)
                if len(window) == need:
                    yield window
                    window = []

    def _documents(self) -> Iterator[str]:
        source = self._open()
        index = 0
        while True:
            text = source.get(index)
            length = source.pass_length
            if length is not None and index >= length:
                return  # the source wrapped around: one pass is done
            yield text
            index += 1


class Validator:
    """Runs validation for a trainer when it is due and reports the loss and perplexity.

    The trainer supplies the pieces that differ between layouts: its model parts, pipeline,
    mesh, loss function and contexts (see :meth:`run`).
    """

    def __init__(self, cfg: Any, batches: ValidationBatches, last_step: int) -> None:
        """Args:
        cfg: the ``[validation]`` section.
        batches: this rank's validation batches.
        last_step: ``training.steps``; validation also runs after it.
        """
        self.cfg = cfg
        self.batches = batches
        self.last_step = last_step

    def due(self, step: int) -> bool:
        """Whether validation runs after training step ``step``."""
        return step % self.cfg.freq == 0 or step == self.last_step

    @torch.no_grad()
    def run(self, trainer: Any) -> dict[str, float]:
        """Evaluate the whole validation run; the model is back in train mode afterwards.

        Returns:
            ``validation_loss`` (mean over the evaluated tokens), ``validation_perplexity``,
            ``validation_tokens`` and ``validation_time`` (seconds), the same on every rank.
        """
        start = time.perf_counter()
        device = trainer.runtime.device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
        for part in trainer.model_parts:
            part.eval()
        try:
            for inputs, labels in self.batches.batches(self.cfg.steps):
                inputs, labels = trainer.shard_sequence(inputs.to(device), labels.to(device))
                total += batch_loss_sum(trainer, inputs, labels)
        finally:
            for part in trainer.model_parts:
                part.train()
            reshard(trainer.model_parts)
        if trainer.mesh is not None:
            if trainer.pipeline is not None:  # only the last stage holds the losses
                dist.all_reduce(total, group=trainer.mesh.get("pp").get_group())
            dist.all_reduce(total, group=trainer.mesh.get("dp_cp").get_group())
        loss_sum, tokens = total.tolist()
        loss = loss_sum / tokens if tokens else float("nan")
        return {
            "validation_loss": loss,
            "validation_perplexity": math.exp(min(loss, 700.0)),
            "validation_tokens": int(tokens),
            "validation_time": time.perf_counter() - start,
        }


def batch_loss_sum(trainer: Any, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(sum of this rank's token losses, its token count)`` for one batch, float64.

    The loss function returns the mean over a batch's (or a microbatch's) counted tokens, so
    the sum is that mean times the count; a batch with no counted token adds nothing.
    """
    counted = labels != IGNORE_INDEX
    if trainer.pipeline is not None:
        with trainer.loss_context(), trainer.autocast():  # as in training
            means = [as_local(m) for m in trainer.pipeline.eval_losses(inputs, labels)]
        if not means:  # not the last stage
            return torch.zeros(2, dtype=torch.float64, device=inputs.device)
        counts = [c.sum() for c in counted.tensor_split(len(means))]
    else:
        (model,) = trainer.model_parts
        with trainer.autocast():
            logits = model(inputs)
        with trainer.loss_context():
            means = [as_local(trainer.loss_fn(logits, labels))]
        counts = [counted.sum()]
    out = torch.zeros(2, dtype=torch.float64, device=inputs.device)
    for mean, count in zip(means, counts, strict=True):
        if count > 0:
            out[0] += mean.double() * count
            out[1] += count
    return out


def reshard(parts: list[torch.nn.Module]) -> None:
    """Free FSDP's unsharded parameters: a forward without backward leaves the root's
    parameters gathered (it expects a backward), which would cost memory until the next step."""
    from torch.distributed.fsdp import FSDPModule

    for part in parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def check_validation(config: Any, dims: Any) -> None:
    """The ``[validation]`` numbers against the model and the layout (when enabled)."""
    v, t = config.validation, config.training
    if v.steps == 0 or v.steps < -1:
        raise UserError(f"validation.steps={v.steps}: use -1 (the whole set) or a count >= 1")
    if v.seq_len > t.seq_len:
        raise UserError(
            f"validation.seq_len={v.seq_len} exceeds training.seq_len={t.seq_len}, the longest "
            f"sequence the model is built for; set it to at most {t.seq_len}"
        )
    check_seq_len("validation.seq_len", v.seq_len, dims)
    if dims.pp > 1 and (v.seq_len, v.local_batch_size) != (t.seq_len, t.local_batch_size):
        # NOTE: torch's pipeline stages size their send/receive buffers on the first step.
        raise UserError(
            f"validation.local_batch_size={v.local_batch_size}, validation.seq_len={v.seq_len}:"
            " under pipeline parallel validation runs the training batch shape; set them to "
            f"training's ({t.local_batch_size} and {t.seq_len})"
        )


def build_validator(config: Any, dims: Any, rank: int, tokenizer: Tokenizer) -> Validator | None:
    """The run's validator, or ``None`` when ``validation.enable`` is off.

    The validation data is opened here, so a bad path or an unreachable dataset is refused
    before any process group starts.
    """
    v = config.validation
    if not v.enable:
        return None
    check_validation(config, dims)
    seed = config.training.seed
    first: DocumentSource | None = open_documents(
        v.dataset, v.dataset_path, seed, section="validation"
    )
    # Known at once only for random access; a stream learns its length at its end.
    random_access = first.pass_length is not None

    def open_source() -> DocumentSource:
        """The same documents for every pass; a stream is opened again from its start."""
        nonlocal first
        if random_access:
            return first
        source = first or open_documents(v.dataset, v.dataset_path, seed, section="validation")
        first = None
        return source

    batches = ValidationBatches(
        open_source,
        tokenizer,
        seq_len=v.seq_len,
        local_batch_size=v.local_batch_size,
        dp_rank=dims.dp_rank(rank),
        dp_degree=dims.dp,
    )
    return Validator(v, batches, config.training.steps)

"""Text generation from a trained model: greedy or sampled, batched, with a key/value cache.

:func:`generate` works on token ids and any titan model (``model(tokens) -> logits``); the
``titan-generate`` command (:mod:`titan_core.generate_cli`) adds loading and the tokenizer.

Sampling follows Hugging Face's order, so the same settings mean the same thing: logits / T,
then top-k, then top-p (nucleus), then one draw from the softmax.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from titan_core.errors import UserError
from titan_core.models.kv_cache import kv_cache


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    """One-line UserErrors for sampling settings that mean nothing, naming the flag."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={max_new_tokens}: must be at least 1")
    if temperature < 0:
        raise UserError(f"--temperature={temperature}: must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k={top_k}: must be at least 1 (or left out for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserError(f"--top-p={top_p}: must be in (0, 1] (1 keeps every token)")


def positions_of(model: nn.Module) -> int:
    """How many positions ``model`` has (its RoPE table length)."""
    return int(model.args.max_seq_len)


def check_length(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """UserError when a prompt is empty or a prompt plus its new tokens exceeds the model."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("--prompt: every prompt needs at least one token; pass non-empty text")
    longest, limit = max(len(p) for p in prompts), positions_of(model)
    if longest + max_new_tokens > limit:
        raise UserError(
            f"--max-new-tokens={max_new_tokens}: the longest prompt has {longest} tokens and the "
            f"model has {limit} positions (max_position_embeddings); ask for at most "
            f"{max(limit - longest, 0)} new tokens or shorten the prompt"
        )


def next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) chosen ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1)  # ascending
        tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # outside the nucleus
        tail[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """(B, S0) ids, each prompt right-aligned; pads are id 0 (masked out of attention)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    return ids


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Stops:
    """Per-row bookkeeping: the new ids so far and which rows have ended at an EOS id."""

    def __init__(self, batch: int, eos_ids: Collection[int], device: torch.device) -> None:
        self.new: list[list[int]] = [[] for _ in range(batch)]
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)

    def add(self, ids: torch.Tensor) -> None:
        for row, (token, done) in enumerate(zip(ids.tolist(), self.done.tolist(), strict=True)):
            if not done:
                self.new[row].append(token)
        self.done |= torch.isin(ids, self.eos)

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_ids: Collection[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` ids.

    Args:
        model: a titan model in eval mode (``load_pretrained``).
        prompts: token ids of each prompt (a batch; lengths may differ).
        max_new_tokens: the most ids added to a prompt.
        temperature: 0 picks the most likely id (greedy); above 0 samples.
        top_k: sample among the ``k`` most likely ids only.
        top_p: sample among the fewest most likely ids whose probability reaches ``p``.
        seed: seeds the sampler (same seed, same ids on the same machine).
        eos_ids: a row ends after emitting one of these (the id is kept in its output).
        use_cache: decode with the key/value cache; False recomputes the whole sequence for
            every new id, one prompt at a time (slow; the reference the cache is tested against).

    Returns:
        Each prompt's new ids, in order.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_length(model, prompts, max_new_tokens)
    device = _device_of(model)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # a fresh random seed, leaving torch's global generator alone
        else:
            generator.manual_seed(seed)
    sample = lambda logits: next_tokens(logits, temperature, top_k, top_p, generator)  # noqa: E731
    if not use_cache:
        return [
            _decode_uncached(model, prompt, max_new_tokens, sample, eos_ids) for prompt in prompts
        ]
    ids = _left_padded(prompts, device)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        valid[row, ids.shape[1] - len(prompt) :] = True
    stops = _Stops(len(prompts), eos_ids, device)
    with kv_cache(model, valid, ids.shape[1] + max_new_tokens) as state:
        state.begin(valid)
        logits = model(ids)[:, -1]
        for step in range(max_new_tokens):
            chosen = sample(logits)
            stops.add(chosen)
            if stops.all_done or step == max_new_tokens - 1:
                break
            state.begin(torch.ones_like(chosen, dtype=torch.bool)[:, None])
            logits = model(chosen[:, None])[:, -1]
    return stops.new


def _decode_uncached(model, prompt, max_new_tokens, sample, eos_ids) -> list[int]:
    """One prompt, the whole sequence through the plain model for every new id."""
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=_device_of(model))
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = sample(model(tokens)[:, -1])
        new.append(int(token))
        if new[-1] in eos_ids:
            break
        tokens = torch.cat((tokens, token[:, None]), dim=1)
    return new

"""Llama 3, built from titan-core's shared decoder. Single-device PyTorch: parallelism, Float8
and compile are applied from outside by ``parallelize.py``."""

from __future__ import annotations

from titan_core.models import Llama3RoPE, RoPE, TransformerBlock
from titan_core.models import Transformer as Decoder
from titan_llama3.args import Llama3Args

__all__ = ["Transformer", "TransformerBlock"]


class Transformer(Decoder):
    """The Llama 3 decoder: tokens (B, S) -> logits (B, S, vocab).

    The shared pre-norm decoder with plain GQA blocks; diff with it: Llama 3.1's frequency
    scaling when the args carry ``rope_scaling``.
    """

    args: Llama3Args

    def build_rope(self, args: Llama3Args) -> RoPE:
        if args.rope_scaling is None:
            return super().build_rope(args)
        return Llama3RoPE(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)

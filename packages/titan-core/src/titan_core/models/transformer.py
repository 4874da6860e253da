"""The pre-norm decoder every dense family shares: embeddings, blocks, final norm, output.

A family picks its variants by subclassing, not by flags: a block subclass overrides
:meth:`TransformerBlock.build_attention` (e.g. Qwen3's per-head q/k norms) or
:meth:`TransformerBlock.build_feed_forward` (e.g. a mixture of experts in some layers), a model
subclass sets ``block_cls`` or overrides :meth:`Transformer.build_rope` (e.g. Llama 3.1's scaled
RoPE). Module names are the contract parallel plans, checkpoints and HF adapters key on.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from titan_core.models.attention import Attention
from titan_core.models.feed_forward import FeedForward
from titan_core.models.norms import RMSNorm
from titan_core.models.rope import RoPE


class DecoderArgs(Protocol):
    """The architecture fields the shared decoder reads (a family's args may hold more)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int: ...

    @property
    def hidden_dim(self) -> int: ...


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x))``, ``h + ffn(ffn_norm(h))``.

    The feed-forward module comes from :meth:`build_feed_forward` and is registered under its
    class's ``block_attr``: ``feed_forward`` for the dense SwiGLU, ``moe`` for a mixture of
    experts, so a layer's parameter names say which it is (``layers.3.moe.experts.w1``).

    Attributes:
        ffn_name: the name the feed-forward module is registered under.
    """

    def __init__(self, layer_id: int, args: DecoderArgs) -> None:
        super().__init__()
        self.attention = self.build_attention(args)
        ffn = self.build_feed_forward(layer_id, args)
        self.ffn_name: str = getattr(type(ffn), "block_attr", "feed_forward")
        self.add_module(self.ffn_name, ffn)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        # NOTE: residual-writing projections start smaller in deeper blocks, so the residual
        # stream's variance does not grow with depth at init.
        self.init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def build_attention(self, args: DecoderArgs) -> Attention:
        """The attention module; a family's block subclass returns its variant."""
        return Attention(args.dim, args.n_heads, args.n_kv_heads, args.head_dim)

    def build_feed_forward(self, layer_id: int, args: DecoderArgs) -> nn.Module:
        """The feed-forward module of layer ``layer_id``: (B, S, dim) -> (B, S, dim), with an
        ``init_weights(init_std)`` method. A family's block subclass returns its variant (an
        :class:`~titan_core.models.moe.MoE` in its sparse layers)."""
        return FeedForward(args.dim, args.hidden_dim)

    @property
    def ffn(self) -> nn.Module:
        """The feed-forward module, whatever it is registered as (``feed_forward`` or ``moe``)."""
        return getattr(self, self.ffn_name)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        return h + self.ffn(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention.init_weights(self.init_std)
        self.ffn.init_weights(self.init_std)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class Transformer(nn.Module):
    """A decoder-only transformer: tokens (B, S) -> logits (B, S, vocab).

    ``layers`` is a ModuleDict keyed by the block's original index, so pipeline stages can drop
    blocks and keep their names (and checkpoint keys). Any of ``tok_embeddings``, ``norm`` and
    ``output`` may be set to None by a pipeline split; forward then passes hidden states through.

    Attributes:
        block_cls: the block class; a family's subclass sets its own.
    """

    block_cls: type[TransformerBlock] = TransformerBlock

    def __init__(self, args: DecoderArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope = self.build_rope(args)
        self.layers = nn.ModuleDict({str(i): self.block_cls(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()

    def build_rope(self, args: DecoderArgs) -> RoPE:
        """Plain RoPE at ``args.rope_theta``; a family with a RoPE variant overrides this."""
        return RoPE(args.head_dim, args.max_seq_len, args.rope_theta)

    def tie_weights(self) -> None:
        """Share the embedding table with the output projection when the args say so."""
        if self.args.tie_word_embeddings and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.args.max_seq_len:
            raise ValueError(
                f"the input holds {tokens.shape[1]} positions but this model has "
                f"{self.args.max_seq_len} (max_seq_len, HF max_position_embeddings); pass at "
                f"most {self.args.max_seq_len} tokens per sequence, e.g. in windows"
            )
        # NOTE: the tables cover the whole training sequence and attention takes the rows it
        # needs: under sequence parallel, a block's input (and a pipeline stage's) holds only
        # this rank's slice of the sequence, while attention sees all of it.
        rope = self.rope(self.args.max_seq_len)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, rope)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after ``to_empty`` from meta)."""
        self.rope.reset_parameters()
        if self.tok_embeddings is not None:
            if self.args.tie_word_embeddings:
                # NOTE: a tied table is also the output projection; unit-variance rows would
                # make the first logits huge, so it takes the output's scale.
                std = self.args.dim**-0.5
                nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
            else:
                nn.init.normal_(self.tok_embeddings.weight)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.args.tie_word_embeddings:
            std = self.args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)

"""Model blocks and Llama 3: shapes, causality, RoPE against direct formulas and transformers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from titan_core.models import Attention, Llama3RoPE, Llama3RopeScaling, RMSNorm, RoPE, apply_rope
from titan_llama3 import LLAMA3_FLAVORS, Transformer

TINY = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], n_layers=2, max_seq_len=32)


def build(args=TINY, seed=0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(seed)
    model.init_weights()
    return model


def test_logits_shape_and_module_names():
    model = build()
    tokens = torch.randint(0, TINY.vocab_size, (3, 17))
    assert model(tokens).shape == (3, 17, TINY.vocab_size)
    names = {n for n, _ in model.named_parameters()}
    for expected in (
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.1.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert expected in names


def test_causal_masking():
    model = build()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % TINY.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_init_is_seeded_and_meta_build_allocates_nothing():
    with torch.device("meta"):
        meta = Transformer(TINY)
    assert all(p.is_meta for p in meta.parameters())
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)


def test_flavor_parameter_counts():
    # Published sizes: Llama 3.2 1B/3B, Llama 3.1 8B/70B/405B.
    expected = {"1B": 1.236e9, "3B": 3.213e9, "8B": 8.030e9, "70B": 70.554e9, "405B": 405.853e9}
    for flavor, count in expected.items():
        with torch.device("meta"):
            model = Transformer(dataclasses.replace(LLAMA3_FLAVORS[flavor], max_seq_len=16))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(count, rel=1e-3)


def test_tied_embeddings_share_one_tensor():
    args = dataclasses.replace(TINY, tie_word_embeddings=True)
    model = build(args)
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(list(build().parameters())) - 1


def test_rope_matches_direct_rotation():
    head_dim, seq, theta = 8, 5, 10000.0
    rope = RoPE(head_dim, seq, theta)
    x = torch.randn(1, seq, 1, head_dim, dtype=torch.float64)
    got = apply_rope(x, *(t.double() for t in rope(seq)))
    want = x.clone()
    for m in range(seq):
        for i in range(head_dim // 2):
            angle = m * theta ** (-2 * i / head_dim)
            a, b = x[0, m, 0, 2 * i].item(), x[0, m, 0, 2 * i + 1].item()
            want[0, m, 0, 2 * i] = a * math.cos(angle) - b * math.sin(angle)
            want[0, m, 0, 2 * i + 1] = a * math.sin(angle) + b * math.cos(angle)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rope_takes_the_first_rows_of_longer_tables():
    rope = RoPE(8, 32, 10000.0)
    x = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(apply_rope(x, *rope(32)), apply_rope(x, *rope(5)), rtol=0, atol=0)


def test_rope_is_relative():
    # <R(m) q, R(n) k> depends only on m - n.
    rope = RoPE(16, 12, 500000.0)
    q, k = torch.randn(16), torch.randn(16)
    qs = apply_rope(q.expand(1, 12, 1, 16), *rope(12))[0, :, 0]  # (12, 16): q at each position
    ks = apply_rope(k.expand(1, 12, 1, 16), *rope(12))[0, :, 0]
    dots = qs @ ks.T  # dots[m, n]
    for offset in (0, 3, -5):
        diagonal = torch.diagonal(dots, offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.diagonal(dots, 0)[0], torch.diagonal(dots, 3)[0])


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_matches_transformers(factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = Llama3RopeScaling(factor=factor)
    config = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = Llama3RoPE(64, 4, 500000.0, scaling).inv_freq()
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, RoPE(64, 4, 500000.0).inv_freq())


def test_gqa_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2, head_dim=8)
    rope = RoPE(8, 6, 10000.0)
    x = torch.randn(2, 6, 32)
    got = attn(x, rope(6))
    q = apply_rope(attn.wq(x).view(2, 6, 4, 8), *rope(6))
    k = apply_rope(attn.wk(x).view(2, 6, 2, 8), *rope(6))
    v = attn.wv(x).view(2, 6, 2, 8)
    heads = []
    for h in range(4):
        kv = h // 2  # query heads 0,1 share kv head 0; 2,3 share kv head 1
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        heads.append(F.softmax(scores, -1) @ v[:, :, kv])
    want = attn.wo(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), want)


def test_model_code_imports_no_distributed():
    import inspect

    import titan_core.models.attention as attention_mod
    import titan_llama3.model as model_mod

    for mod in (model_mod, attention_mod):
        assert "torch.distributed" not in inspect.getsource(mod)

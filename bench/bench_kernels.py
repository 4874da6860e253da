"""CPU levers for a training step, each against the kernel titan uses, at one model's shapes.

The step of a small model on a CPU is nearly all matmul and SDPA (``bench_train.py`` prints the
split). This measures the alternatives to those kernels, forward plus backward, side by side in
one run, so a lever that does not pay is on record with its number:

- attention: SDPA's CPU flash kernel (titan's) vs the same attention written as matmul, mask and
  softmax, eager and compiled (flex attention has no CPU backward in torch 2.13);
- the feed-forward (SwiGLU): eager vs ``torch.compile`` default vs ``mode="max-autotune"``
  (inductor's own C++ GEMM instead of the BLAS library's);
- the q/k/v projections: three matmuls (titan's layout) vs one fused matmul of their width;
- fp32 matmuls computed in bfloat16 by oneDNN (``torch.backends.mkldnn.matmul.fp32_precision =
  "bf16"``, the CPU's TF32), with the error against float64 printed, since the setting is taken
  silently on CPUs whose oneDNN build does not use it (the error then stays at fp32's).

    nox -s bench -- kernels          # or: python bench/bench_kernels.py --flavor debugmodel
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from titan_core.train_spec import get_train_spec


def timed_ms(fn, inputs: tuple[torch.Tensor, ...], grad, rounds: int) -> float:
    """Best of ``rounds`` batches of forward + backward, in ms per call (noise only slows).

    ``fn`` returns a tensor or a tuple of them; ``grad`` matches it.
    """

    def step():
        torch.autograd.backward(fn(*inputs), grad)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(5):
            step()
        best = min(best, (time.perf_counter() - start) / 5)
    return best * 1e3


def attention_rows(b, s, heads, kv_heads, head_dim, rounds):
    """SDPA flash vs matmul + mask + softmax (eager, compiled); results checked equal."""
    mask = torch.ones(s, s, dtype=torch.bool).tril()

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def math(q, k, v):
        k, v = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    q = torch.randn(b, heads, s, head_dim, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, s, head_dim, requires_grad=True) for _ in "kv")
    grad = torch.randn(b, heads, s, head_dim)
    torch.testing.assert_close(math(q, k, v), flash(q, k, v), rtol=1e-4, atol=1e-5)
    label = f"attention B{b} H{heads}/{kv_heads} S{s} D{head_dim}"
    variants = {"SDPA flash (titan)": flash, "matmul+softmax": math}
    variants["matmul+softmax, compiled"] = torch.compile(math)
    return [(label, name, timed_ms(fn, (q, k, v), grad, rounds)) for name, fn in variants.items()]


def feed_forward_rows(tokens, dim, hidden, rounds):
    """SwiGLU eager vs compiled (default and max-autotune GEMMs)."""
    w1, w3 = (torch.randn(hidden, dim, requires_grad=True) for _ in "13")
    w2 = torch.randn(dim, hidden, requires_grad=True)

    def swiglu(x):
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    x = torch.randn(tokens, dim, requires_grad=True)
    label = f"SwiGLU {tokens} tokens, {dim} -> {hidden}"
    rows = [(label, "eager (titan)", timed_ms(swiglu, (x,), torch.randn_like(x), rounds))]
    for mode in ("default", "max-autotune"):
        torch._dynamo.reset()
        compiled = torch.compile(swiglu, mode=mode)
        rows.append((label, f"compiled, {mode}", timed_ms(compiled, (x,), x.detach(), rounds)))
    return rows


def projection_rows(tokens, dim, q_width, kv_width, rounds):
    """q, k, v as three matmuls vs one matmul of their summed width, split into three views."""
    x = torch.randn(tokens, dim, requires_grad=True)
    widths = (q_width, kv_width, kv_width)
    weights = [torch.randn(w, dim, requires_grad=True) for w in widths]
    fused = torch.randn(sum(widths), dim, requires_grad=True)
    label = f"q/k/v projections {tokens} tokens, {dim} -> {widths}"

    def separate(x):
        return tuple(F.linear(x, w) for w in weights)

    def one(x):
        return F.linear(x, fused).split(widths, dim=-1)

    grads = tuple(torch.randn(tokens, w) for w in widths)
    return [
        (label, "three matmuls (titan)", timed_ms(separate, (x,), grads, rounds)),
        (label, "one fused matmul", timed_ms(one, (x,), grads, rounds)),
    ]


def matmul_precision_rows(tokens, dim, hidden, rounds):
    """fp32 matmul at IEEE precision vs oneDNN's bf16 path; labels carry the max error vs fp64."""
    x = torch.randn(tokens, dim, requires_grad=True)
    w = torch.randn(hidden, dim, requires_grad=True)
    exact = F.linear(x.double(), w.double())
    grad = torch.randn(tokens, hidden)
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    label = f"fp32 matmul {tokens} tokens, {dim} -> {hidden}"
    rows = []
    try:
        for precision in ("ieee", "bf16"):
            setting.fp32_precision = precision
            error = (F.linear(x, w).double() - exact).abs().max().item()
            ms = timed_ms(F.linear, (x, w), grad, rounds)
            rows.append((label, f"{precision} (err {error:.0e})", ms))
    finally:
        setting.fp32_precision = before
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debugmodel", help="llama3 flavor for the shapes")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4, help="timed batches; the best counts")
    args = parser.parse_args()
    spec = get_train_spec("llama3")
    a = spec.flavors[args.flavor]
    with torch.device("meta"):
        block = spec.model_cls(a).layers["0"]
    head_dim, hidden = block.attention.head_dim, block.feed_forward.w1.out_features
    tokens = args.batch * args.seq_len
    rows = attention_rows(args.batch, args.seq_len, a.n_heads, a.n_kv_heads, head_dim, args.rounds)
    rows += feed_forward_rows(tokens, a.dim, hidden, args.rounds)
    q_width, kv_width = a.n_heads * head_dim, a.n_kv_heads * head_dim
    rows += projection_rows(tokens, a.dim, q_width, kv_width, args.rounds)
    rows += matmul_precision_rows(tokens, a.dim, hidden, args.rounds)
    print(f"CPU, threads {torch.get_num_threads()}, llama3 {args.flavor} shapes, fp32, fwd+bwd")
    base: dict[str, float] = {}
    for label, name, ms in rows:  # the first row of each label is titan's kernel
        if label not in base:
            base[label] = ms
            print(label)
        print(f"  {name:<28}: {ms:8.2f} ms  speed {base[label] / ms:4.2f}x titan's")


if __name__ == "__main__":
    main()

"""Training throughput of a llama3 flavor: our trainer vs a plain transformers loop.

Both train the same model size (same dim, layers, heads, kv heads, FFN width, vocab, ties) on the
same batch and sequence length, one process: fp32 on a CPU, bf16 autocast on a GPU (the
trainer's default there). The two are measured in alternating rounds within one run (a CPU's
speed drifts by 15-20% between runs), and the report is their ratio, plus our MFU, against the
same peak the trainer divides by (``device_peak_flops``: the datasheet bf16 peak on a GPU, the
CPU's fp32 peak on a CPU).

On a CPU it then profiles a few steps of each and prints where they go: the library kernels both
call (matmul, SDPA) and everything else. The ceiling it prints, the ratio if everything but the
library kernels took no time in our step, bounds what any change around those kernels can reach.
It is measured, not inferred from the profile: our step's matmul and SDPA calls are recorded
with their shapes and replayed alone, timed in the same alternating rounds.

    nox -s bench                       # or: python bench/bench_train.py --rounds 3 --steps 5
    python bench/bench_train.py --flavor 1B --seq-len 4096 --batch 2 --compile   # one GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from titan_core.config import build_config
from titan_core.metrics import device_peak_flops
from titan_core.trainer import Trainer


def build_ours(seq_len: int, batch: int, dump: str, flavor: str, extra: list[str]) -> Trainer:
    config = build_config(
        [
            *extra,
            "--model.flavor",
            flavor,
            "--job.dump_folder",
            dump,
            "--training.seq_len",
            str(seq_len),
            "--training.local_batch_size",
            str(batch),
            "--training.steps",
            "1000",
            "--metrics.no_enable_tensorboard",
        ]
    )
    return Trainer(config)


def build_hf(trainer: Trainer):
    """The same architecture as transformers.LlamaForCausalLM, trained with torch's AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = trainer.model_args
    hidden = trainer.model_parts[0].layers["0"].feed_forward.w1.out_features
    config = LlamaConfig(
        vocab_size=a.vocab_size,
        hidden_size=a.dim,
        intermediate_size=hidden,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        rms_norm_eps=a.norm_eps,
        max_position_embeddings=a.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        tie_word_embeddings=a.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(trainer.runtime.device).train()
    n_ours = sum(p.numel() for p in trainer.model_parts[0].parameters())
    n_hf = sum(p.numel() for p in model.parameters())
    assert n_ours == n_hf, f"model sizes differ: ours {n_ours}, transformers {n_hf}"
    cfg = trainer.config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    return model, optimizer


def hf_step(model, optimizer, batch, autocast) -> float:
    loss = 0.0
    for inputs, labels in batch:
        with autocast():
            logits = model(input_ids=inputs).logits
        micro = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()) / len(batch)
        micro.backward()
        loss += micro.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def timed(fn, steps: int, tokens_per_step: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debugmodel", help="llama3 flavor")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="our trainer compiles blocks+loss")
    parser.add_argument("--ac", default="none", help="our activation_checkpoint.mode")
    args = parser.parse_args()
    extra = ["--activation_checkpoint.mode", args.ac] + (["--compile.enable"] * args.compile)
    with tempfile.TemporaryDirectory() as dump:
        trainer = build_ours(args.seq_len, args.batch, dump, args.flavor, extra)
        device = trainer.runtime.device
        model, optimizer = build_hf(trainer)
        batch = [(x.to(device), y.to(device)) for x, y in trainer.loader.next_batch()]
        tokens = args.seq_len * args.batch
        ours_fn = lambda: trainer.train_step(trainer.loader.next_batch())  # noqa: E731
        hf_fn = lambda: hf_step(model, optimizer, batch, trainer.autocast)  # noqa: E731
        for fn in (ours_fn, hf_fn):  # warm-up: allocator, first-call costs, compilation
            fn(), fn()
        kernels_fn = replay_library_calls(ours_fn) if device.type == "cpu" else None
        ours, theirs, kernels_only = [], [], []
        for _ in range(args.rounds):
            if device.type == "cpu":
                kernels_only.append(timed(kernels_fn, args.steps, tokens, device))
            ours.append(timed(ours_fn, args.steps, tokens, device))
            theirs.append(timed(hf_fn, args.steps, tokens, device))
        tps_ours, tps_hf = statistics.median(ours), statistics.median(theirs)
        rate, peak_source = device_peak_flops(device)
        mfu = trainer.flops_per_token * tps_ours / rate
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{where}, threads {torch.get_num_threads()}, llama3 {args.flavor}, ", end="")
        print(f"seq_len {args.seq_len}, batch {args.batch}, compile {args.compile}, AC {args.ac}")
        print(f"titan trainer        : {tps_ours:9,.0f} tokens/s  (rounds: {_fmt(ours)})")
        print(f"transformers + AdamW : {tps_hf:9,.0f} tokens/s  (rounds: {_fmt(theirs)})")
        print(f"ratio titan / transformers: {tps_ours / tps_hf:.2f}x (goal >= 1.3x, compiled)")
        print(f"MFU {mfu:.1%} (goal >= 60%), as the trainer logs it: vs {peak_source}")
        if device.type == "cpu":
            report_kernel_split(ours_fn, hf_fn, args.steps)
            ceiling = statistics.median(kernels_only)
            print(
                f"titan's matmul + SDPA calls alone: {ceiling:9,.0f} tokens/s (rounds: "
                f"{_fmt(kernels_only)}): ceiling titan / transformers {ceiling / tps_hf:.2f}x"
            )


# Library kernels both implementations call; on a CPU they are nearly all of a step.
KERNELS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
}


def kernel_split(fn, steps: int) -> dict[str, float]:
    """Shares of the profiled self time of ``steps`` calls of ``fn``: matmul, attention, other.

    The profiler's own cost lands on the many small ops, so "other" reads high; the ceiling is
    therefore measured by :func:`replay_library_calls`, not computed from these shares.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    total, split = 0.0, dict.fromkeys(KERNELS, 0.0)
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        for group, names in KERNELS.items():
            if event.key in names:
                split[group] += event.self_cpu_time_total
    shares = {group: t / total for group, t in split.items()}
    return shares | {"other": 1.0 - sum(shares.values())}


def report_kernel_split(ours_fn, hf_fn, steps: int) -> None:
    """Print where a profiled step of each goes (the profiler's cost inflates "other")."""
    print(f"where a step goes (torch.profiler, {steps} steps, share of self time):")
    print(f"  titan trainer        : {_fmt_split(kernel_split(ours_fn, steps))}")
    print(f"  transformers + AdamW : {_fmt_split(kernel_split(hf_fn, steps))}")


def replay_library_calls(fn):
    """A function that makes the matmul and SDPA calls of one call of ``fn``, and nothing else.

    Each ``aten::mm`` is replayed on contiguous operands of its recorded shapes, each SDPA
    forward as SDPA forward and backward on inputs of its shapes. Operand layouts (transposed
    or not) are not recorded; interleaved runs on this CPU found them within a few percent. Only
    ``aten::mm`` is replayed (llama's linears have no bias): a model whose step also calls
    ``addmm`` or ``bmm`` would get a ceiling that reads high, never low.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    matmuls, attentions = [], []
    for event in prof.events():
        if event.name == "aten::mm":
            matmuls.append(tuple(torch.randn(shape) for shape in event.input_shapes[:2]))
        elif event.name == KERNELS["attention"][0]:
            q, k, v = (torch.randn(shape, requires_grad=True) for shape in event.input_shapes[:3])
            attentions.append((q, k, v, torch.randn(q.shape[:-1] + v.shape[-1:])))

    def run() -> None:
        for a, b in matmuls:
            torch.mm(a, b)
        for q, k, v, grad in attentions:
            gqa = q.shape[1] != k.shape[1]
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            torch.autograd.grad(out, (q, k, v), grad)

    return run


def _fmt_split(split: dict[str, float]) -> str:
    return ", ".join(f"{group} {share:.0%}" for group, share in split.items())


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    main()

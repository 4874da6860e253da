"""Training throughput of a llama3 flavor: our trainer vs a plain transformers loop.

Both train the same model size (same dim, layers, heads, kv heads, FFN width, vocab, ties) on the
same batch and sequence length, one process: fp32 on a CPU, bf16 autocast on a GPU (the
trainer's default there). The two are measured in alternating rounds within one run (a CPU's
speed drifts by 15-20% between runs), and the report is their ratio, plus our MFU: against the
fp32 matmul rate measured in the same run on a CPU, against the datasheet bf16 peak on a GPU.

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
from titan_core.metrics import device_peak_flops, measure_matmul_flops
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
        ours, theirs, rates = [], [], []
        for _ in range(args.rounds):
            if device.type == "cpu":
                rates.append(measure_matmul_flops(device))
            else:
                rates.append(device_peak_flops(device)[0])
            ours.append(timed(ours_fn, args.steps, tokens, device))
            theirs.append(timed(hf_fn, args.steps, tokens, device))
        tps_ours, tps_hf = statistics.median(ours), statistics.median(theirs)
        rate = statistics.median(rates)
        mfu = trainer.flops_per_token * tps_ours / rate
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"{where}, threads {torch.get_num_threads()}, llama3 {args.flavor}, ", end="")
        print(f"seq_len {args.seq_len}, batch {args.batch}, compile {args.compile}, AC {args.ac}")
        print(f"titan trainer        : {tps_ours:9,.0f} tokens/s  (rounds: {_fmt(ours)})")
        print(f"transformers + AdamW : {tps_hf:9,.0f} tokens/s  (rounds: {_fmt(theirs)})")
        print(f"ratio titan / transformers: {tps_ours / tps_hf:.2f}x (goal >= 1.5x)")
        kind = "measured fp32 matmul rate" if device.type == "cpu" else "datasheet bf16 peak"
        print(f"MFU vs {kind} ({rate / 1e12:.3g} TFLOP/s): {mfu:.1%} (goal >= 60%)")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


if __name__ == "__main__":
    main()

"""Float8 vs high precision: tokens/s and MFU of the same llama3 model, side by side in one run.

On a GPU (compute capability >= 8.9) the float8 run uses torchao's real kernels: this is the
speed-up Float8 is for (torchtitan reports +48% tokens/s for Llama 3.1 8B on 8xH100 with compile).
On a CPU the float8 run is torchao's emulation (``emulate = true``), which does the float8 casts
and then fp32 matmuls: it only costs, and the ratio printed there is that overhead, not a gain.
Rounds alternate between the two trainers (a CPU's speed drifts 15-20% between runs).

    nox -s bench -- float8                      # or: python bench/bench_float8.py
    python bench/bench_float8.py --flavor 8B --seq-len 8192 --batch 1 --compile   # one GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

from bench_train import _fmt, build_ours, timed
from titan_core.metrics import device_peak_flops

FLOAT8 = ["--model.converters", "quantize.linear.float8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="debugmodel", help="llama3 flavor")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="compile blocks and loss")
    parser.add_argument("--recipe", default="tensorwise", help="quantize.linear.float8.recipe_name")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    extra = ["--compile.enable"] * args.compile
    float8 = [*extra, *FLOAT8, "--quantize.linear.float8.recipe_name", args.recipe]
    float8 += [] if on_gpu else ["--quantize.linear.float8.emulate"]
    float8 += ["--quantize.linear.float8.filter_fqns", "output"]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        runs = {
            "high precision": build_ours(args.seq_len, args.batch, d1, args.flavor, extra),
            f"float8 {args.recipe}": build_ours(args.seq_len, args.batch, d2, args.flavor, float8),
        }
        device = next(iter(runs.values())).runtime.device
        steps = {
            name: (lambda t=t: t.train_step(t.loader.next_batch())) for name, t in runs.items()
        }
        for fn in steps.values():  # warm-up: allocator, first calls, compilation
            fn(), fn()
        tokens = args.seq_len * args.batch
        measured: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                measured[name].append(timed(fn, args.steps, tokens, device))
        report(args, device, runs, measured, device_peak_flops(device)[0])


def report(args, device, runs, measured, rate) -> None:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (emulated float8)"
    print(f"{where}, llama3 {args.flavor}, seq_len {args.seq_len}, batch {args.batch}, ", end="")
    print(f"compile {args.compile}")
    tps = {name: statistics.median(values) for name, values in measured.items()}
    for name, trainer in runs.items():
        mfu = trainer.flops_per_token * tps[name] / rate
        print(
            f"{name:>22}: {tps[name]:9,.0f} tokens/s, MFU {mfu:.1%}  (rounds {_fmt(measured[name])})"
        )
    (base, b), (f8, f) = tps.items()
    print(f"ratio {f8} / {base}: {f / b:.2f}x")


if __name__ == "__main__":
    main()

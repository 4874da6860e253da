"""torchtitan's llama3 on titan's benchmark shapes, for ``bench_gpu.py``'s comparison.

Written against torchtitan v0.2.2. Its llama3 has no 1B or 3B flavor and no flag that cuts
layers, so the child process adds titan's shape to torchtitan's flavor table before its trainer
starts. The job is a TOML file with the same batch, sequence length, steps and AC as titan's
run, titan's embedded corpus as its ``c4_test`` data and titan's embedded ``tokenizer.json``.
Its numbers come from its console lines. Differences that remain: torchtitan's llama3 never ties
the embedding and output weights (titan's 1B and 3B do, as Llama 3.2 does), and its memory
figure is the allocator's peak *reserved* memory (titan's is the peak allocated).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

# torchtitan and what it imports that the GPU machine's image lacks.
WHEELS = (
    "torchtitan==0.2.2", "torchdata==0.11.0", "tyro==1.0.17", "docstring-parser==0.18.0",
    "typeguard==4.6.1", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19",
)  # fmt: skip

# Its console line: "step:  5  loss:  7.12345  grad_norm:  1.2345  memory: 12.34GiB(8.67%)
# tps: 12,345  tflops: 123.45  mfu: 12.34%" (with metrics.disable_color_printing).
LINE = re.compile(
    r"step:\s*(\d+)\s+loss:\s*(\S+).*?memory:\s*([\d.]+)GiB.*?tps:\s*([\d,]+)\s+"
    r"tflops:\s*([\d,.]+)\s+mfu:\s*([\d.]+)%"
)


def status(on_gpu: bool) -> str:
    """'' when torchtitan can run here, else why not (one line)."""
    if importlib.util.find_spec("torchtitan") is None:
        return "not installed (carry its wheel to compare; see --print-wheels)"
    if not on_gpu:
        return "installed, but it trains on CUDA only: not run on CPU"
    return ""


def job_toml(flavor: str, batch: int, seq_len: int, steps: int, mode: str, dump: Path,
             assets: Path) -> str:  # fmt: skip
    """The torchtitan job of one run; ``assets`` is titan's embedded corpus and tokenizer."""
    data = dump.parent / "torchtitan-data"  # load_dataset reads every json file of a folder
    if not data.is_dir():
        data.mkdir()
        shutil.copy(assets / "corpus.jsonl", data / "corpus.jsonl")
    converters = '"quantize.linear.float8"' if "float8" in mode else ""
    return f"""[job]
dump_folder = "{dump}"
[model]
name = "llama3"
flavor = "{flavor}"
hf_assets_path = "{assets}"
converters = [{converters}]
[training]
dataset = "c4_test"
dataset_path = "{data}"
local_batch_size = {batch}
seq_len = {seq_len}
steps = {steps}
[lr_scheduler]
warmup_steps = 2
[activation_checkpoint]
mode = "none"
[compile]
enable = {str("compile" in mode).lower()}
[quantize.linear.float8]
filter_fqns = ["output"]
[metrics]
log_freq = 1
disable_color_printing = true
"""


def records(log: str, dump: Path) -> list[dict]:
    """Per-step records from the console lines, in titan's metrics.jsonl keys."""
    del dump  # torchtitan's numbers are in its log
    return [
        {"step": int(m[0]), "loss": float(m[1]), "memory_gib": float(m[2]),
         "tps": float(m[3].replace(",", "")), "tflops": float(m[4].replace(",", "")),
         "mfu": float(m[5]) / 100}
        for m in LINE.findall(log)
    ]  # fmt: skip


def train(name: str, args, rest: list[str]) -> int:
    """Add titan's model args ``args`` to torchtitan's llama3 flavors as ``name``, then run
    torchtitan's trainer with the command line ``rest``."""
    sys.argv = [sys.argv[0], *rest]  # torchtitan's ConfigManager binds sys.argv on import
    from torchtitan.models.llama3 import TransformerModelArgs, llama3_args
    from torchtitan.train import Trainer, main

    llama3_args[name] = TransformerModelArgs(
        dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size, multiple_of=args.multiple_of,
        ffn_dim_multiplier=args.ffn_dim_multiplier, norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
    )  # fmt: skip
    main(Trainer)
    return 0

"""Conversion speed and memory: HF -> DCP -> HF of a ~1 GB random Llama vs ``cp -r``, and the
import of the same model block-quantized to FP8 (the DeepSeek V3 release format), dequantized
while streaming.

The model has Llama 3.2 1B shapes with fewer layers, stored in bfloat16 (as the hub ships it)
and converted in bfloat16 both ways, so every step moves the same bytes as ``cp -r`` of the
folder. Each conversion runs as its own ``titan-convert`` process, timed from start to exit
(interpreter start and imports included) with its peak RSS read from the kernel's rusage for
that process alone. ``cp -r`` runs in the same round, on the same warm page cache.

    nox -s bench -- convert            # or: python bench/bench_convert.py --layers 4 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from titan_core.hf import CONFIG_FILE, HFWriter, write_json
from titan_llama3 import LLAMA3_FLAVORS, train_spec

MB = 2**20


def build_hf_folder(folder: Path, n_layers: int, shard_bytes: int) -> None:
    """A random bf16 Llama (1B shapes, ``n_layers`` blocks) as an HF folder, tensor by tensor."""
    adapter = train_spec.state_dict_adapter
    args = dataclasses.replace(LLAMA3_FLAVORS["1B"], n_layers=n_layers, max_seq_len=8192)
    layout = {k: (s, torch.bfloat16) for k, s in adapter.expected_hf(args).items()}
    folder.mkdir(parents=True)
    writer = HFWriter(folder, layout, shard_bytes)
    for name, (shape, dtype) in layout.items():
        writer.write(name, (torch.randn(shape) * 0.02).to(dtype))
    writer.close()
    write_json(folder / CONFIG_FILE, adapter.hf_config(args, torch.bfloat16))


# NOTE: a child's peak RSS starts at its parent's (Linux carries the high-water mark across
# fork and exec), and this process holds torch. A bare interpreter launches each command, so the
# figure is the command's own.
_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


_RAW_COPY = """
import os, sys
src, dst = sys.argv[1:]
os.mkdir(dst)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb") as f:
        data = f.read()
    with open(os.path.join(dst, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one command, run as its own process."""
    out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    seconds, rss_kib, code = out.split()
    if code != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return float(seconds), int(rss_kib) / 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def largest_file(folder: Path, suffix: str) -> int:
    return max(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix))


def conversion_steps(src: Path, work: Path, shard_size: str) -> dict[str, list[str]]:
    """The commands of one round, references first, each writing under ``work``."""
    convert = [sys.executable, "-m", "titan_convert"]
    return {
        "cp -r (reference)": ["cp", "-r", str(src), str(work / "copy")],
        "cp -r + sync": ["sh", "-c", f"cp -r '{src}' '{work / 'copy'}' && sync"],
        # The bytes of the folder read and written back from user space (what any
        # converter must do, unlike cp, which copies inside the kernel): a floor for us.
        "python read + write + fsync": [sys.executable, "-S", "-c", _RAW_COPY, str(src),
                                        str(work / "copy")],
        "hf-to-dcp": [*convert, "hf-to-dcp", str(src), str(work / "dcp"), "--dtype",
                      "bfloat16"],
        "dcp-to-hf": [*convert, "dcp-to-hf", str(work / "dcp"), str(work / "out"),
                      "--export-dtype", "bfloat16", "--max-shard-size", shard_size],
        # MiB/s of this row count the bf16 bytes produced, as the other rows do
        "hf-to-dcp from FP8": [*convert, "hf-to-dcp", str(work / "fp8"),
                               str(work / "dcp8"), "--dtype", "bfloat16"],
    }  # fmt: skip


def run_rounds(
    steps: dict[str, list[str]], work: Path, rounds: int
) -> dict[str, list[tuple[float, float]]]:
    """(seconds, peak RSS MiB) of every step in every round, each step from clean outputs."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, cmd in steps.items():
            shutil.rmtree(work / "copy", ignore_errors=True)
            if name != "dcp-to-hf":  # dcp-to-hf reads the DCP that hf-to-dcp just wrote
                shutil.rmtree(work / "dcp", ignore_errors=True)
            if name == "dcp-to-hf":
                shutil.rmtree(work / "out", ignore_errors=True)
            shutil.rmtree(work / "dcp8", ignore_errors=True)
            # NOTE: written-back page cache before every step: the kernel throttles a writer
            # while earlier steps' dirty pages are still being flushed.
            os.sync()
            results[name].append(measure(cmd))
    return results


def print_table(
    src: Path, results: dict[str, list[tuple[float, float]]], startup: float, baseline: float
) -> None:
    size, shard = folder_bytes(src), largest_file(src, ".safetensors")
    cp_seconds = min(s for s, _ in results["cp -r (reference)"])
    print(f"\nmodel: {size / MB:,.0f} MiB bf16 in {len(list(src.glob('*.safetensors')))} "
          f"shards (largest {shard / MB:,.0f} MiB); interpreter + imports alone: "
          f"{startup:.2f} s, {baseline:,.0f} MiB RSS; {os.cpu_count()} cores\n")  # fmt: skip
    # The conversions' own work: their time less the interpreter and imports (cp and the
    # plain copy start in milliseconds).
    print("| step | seconds | MiB/s | throughput vs cp | after start-up: MiB/s, vs cp "
          "| peak RSS (MiB) | RSS / largest shard |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = min(s for s, _ in runs)
        rss = max(r for _, r in runs)
        busy = seconds - startup if name.startswith(("hf-to-dcp", "dcp-to-hf")) else seconds
        print(f"| {name} | {seconds:.2f} | {size / MB / seconds:,.0f} | "
              f"{cp_seconds / seconds:.0%} | {size / MB / busy:,.0f}, {cp_seconds / busy:.0%} "
              f"| {rss:,.0f} | {rss * MB / shard:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="blocks (4: about 1 GB in bf16)")
    parser.add_argument("--shard-size", default="500MB", help="safetensors shard size, both ways")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the best time is reported")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    opts = parser.parse_args()
    from titan_convert.dcp_to_hf import parse_size

    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=opts.workdir))
    try:
        src = work / "hf"
        build_hf_folder(src, opts.layers, parse_size(opts.shard_size))
        build_fp8_folder(src, work / "fp8")
        imports = "import titan_convert.hf_to_dcp, titan_convert.dcp_to_hf, titan_llama3"
        startup, baseline = measure([sys.executable, "-c", imports])
        results = run_rounds(conversion_steps(src, work, opts.shard_size), work, opts.rounds)
        print_table(src, results, startup, baseline)
        assert folder_bytes(work / "out") == folder_bytes(src)  # the round trip wrote every byte
    finally:
        shutil.rmtree(work, ignore_errors=True)


FP8_BLOCK, E4M3_MAX = 128, 448.0


def build_fp8_folder(src: Path, dst: Path) -> None:
    """``src`` with every 2-D projection weight of the blocks stored as float8_e4m3fn plus a
    float32 ``weight_scale_inv`` per 128x128 block, and config.json's quantization_config."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, dst / file.name)
            continue
        state = load_file(file)
        for name in [k for k in state if k.startswith("model.layers.") and state[k].dim() == 2]:
            state[name], state[name + "_scale_inv"] = _block_quantize(state[name])
        save_file(state, dst / file.name, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():  # the scales live in their weight's shard
        content = json.loads(index.read_text())
        weight_map = content["weight_map"]
        for name in [k for k in weight_map if k.startswith("model.layers.") and "proj" in k]:
            weight_map[name + "_scale_inv"] = weight_map[name]
        index.write_text(json.dumps(content))
    config = json.loads((dst / CONFIG_FILE).read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }  # fmt: skip
    (dst / CONFIG_FILE).write_text(json.dumps(config))


def _block_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    pad = torch.nn.functional.pad(weight.float(), (0, -cols % FP8_BLOCK, 0, -rows % FP8_BLOCK))
    blocks = pad.unflatten(0, (-1, FP8_BLOCK)).unflatten(2, (-1, FP8_BLOCK))  # (R/b, b, C/b, b)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    full = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:rows, :cols]
    return (weight.float() / full).to(torch.float8_e4m3fn), scale


if __name__ == "__main__":
    main()

"""Float8 and MX training on CPU (torchao's emulation): the recipes track the high-precision
run, the torchtitan Float8 TOML trains (compile included), checkpoints cross freely between
Float8 and plain runs, and a plugin converter's hooks are really called."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from helpers import FAST, FLOAT8_TOML, REPO, losses, read_metrics, run_cli
from titan_core import load_pretrained
from titan_core.config import build_config
from titan_core.quantize import ModelConverter, apply_converters, build_converters
from titan_core.quantize.converters import _LOCAL, register_converter
from titan_core.train_spec import get_train_spec

pytestmark = pytest.mark.slow

FLOAT8 = ["--model.converters", "float8", "--quantize.linear.float8.emulate"]


def train(tmp_path, name: str, extra: list[str]) -> list[float]:
    dump = tmp_path / name
    proc = run_cli([*FAST, *extra, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(dump)


def test_float8_recipes_track_the_high_precision_run(tmp_path):
    """30 steps of debugmodel. e4m3 keeps 3 mantissa bits, so each cast is off by at most 2^-4
    of its value; over a dot product of K >= 256 terms the errors mostly cancel, leaving ~0.1%
    on the outputs. Measured: losses within 0.1% of the fp32 run at every step; each step is
    asserted within 1%. The curves must also differ (> 1e-5 somewhere): a run that silently
    skipped the conversion would be bit-identical (runs are deterministic)."""
    steps = ["--training.steps", "30", "--training.local_batch_size", "4"]
    plain = train(tmp_path, "plain", steps)
    assert plain[-1] < plain[0] - 1.0  # it trains
    for recipe in ("tensorwise", "rowwise"):
        f8 = train(
            tmp_path, recipe, [*steps, *FLOAT8, "--quantize.linear.float8.recipe_name", recipe]
        )
        rel = [abs(a - b) / b for a, b in zip(f8, plain, strict=True)]
        assert max(rel) < 1e-2, (recipe, max(rel))
        assert max(rel) > 1e-5, f"{recipe}: identical to the fp32 run: nothing was converted"


def _one_ulp_sensitivity(converters: list[str]) -> float:
    """Largest relative loss change over 4 steps when the attention-norm weights move by 1 ulp."""
    spec = get_train_spec("llama3")
    args = dataclasses.replace(spec.flavors["debugmodel"], max_seq_len=64)
    torch.manual_seed(1)
    batches = [torch.randint(0, 2000, (4, 65)) for _ in range(4)]
    curves = []
    for nudge in (False, True):
        with torch.device("meta"):
            model = spec.model_cls(args)
        config = build_config(
            ["--model.converters", ",".join(converters), "--quantize.linear.float8.emulate"]
        )
        apply_converters(model, build_converters(config, torch.device("cpu")))
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        model.init_weights()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if nudge and name.endswith("attention_norm.weight"):
                    p.copy_(torch.nextafter(p, p + 1))
        opt = torch.optim.AdamW(model.parameters(), lr=8e-4)
        curve = []
        for batch in batches:
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    return max(abs(a - b) / a for a, b in zip(*curves, strict=True))


def test_float8_turns_a_one_ulp_change_into_float8_noise():
    """Why Float8 under TP is compared at 2e-4 after step 1 (test_float8_parallel): a 1-ulp change
    of some weights leaves fp32 losses equal to ~1e-7 but moves float8 losses by ~1e-5..1e-4,
    because a cast that lands next to a rounding boundary flips to the neighbouring float8
    value."""
    assert _one_ulp_sensitivity([]) <= 1e-6
    float8 = _one_ulp_sensitivity(["float8"])
    assert 1e-6 < float8 < 2e-4, float8


def test_the_torchtitan_float8_toml_trains_with_compile(tmp_path):
    """The issue's TOML unchanged, with tiny overrides (emulate among them: on some CPUs
    torch._scaled_mm is oneDNN's reference kernel, too slow for a test); compile of the blocks
    and the loss included."""
    (tmp_path / "float8.toml").write_text(FLOAT8_TOML)
    args = [
        "--job.config_file", str(tmp_path / "float8.toml"), "--model.flavor", "debugmodel",
        "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree",
        "1", "--training.steps", "2", "--training.dataset", "embedded",
        "--quantize.linear.float8.emulate",
    ]  # fmt: skip
    proc = run_cli([*FAST, *args, "--job.dump_folder", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "float8 tensorwise, emulated: converted" in proc.stderr
    assert "skipped 1: output (filter_fqns)" in proc.stderr
    assert "Failed to load" not in proc.stderr and "pytree" not in proc.stderr  # torchao's noise
    got = losses(tmp_path / "run")
    assert len(got) == 2 and all(x == x for x in got)


def _dcp_to_hf(ckpt, out) -> None:
    cmd = [sys.executable, "-m", "titan_convert", "dcp-to-hf", str(ckpt), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_checkpoints_cross_between_float8_and_plain_runs(tmp_path):
    """A Float8 run's checkpoint (float8 all-gather weights) holds plain fp32 tensors with the
    usual keys: a plain run resumes from it, a Float8 run resumes from a plain one, it converts
    to HF and load_pretrained reads it, weights equal."""
    gather = [*FLOAT8, "--quantize.linear.float8.enable_fsdp_float8_all_gather"]
    ck = ["--checkpoint.enable", "--checkpoint.interval", "2", "--training.local_batch_size", "4"]
    train(tmp_path, "a", [*ck, *gather, "--training.steps", "2"])
    train(tmp_path, "a", [*ck, "--training.steps", "4"])  # plain, resumes at step 3
    train(tmp_path, "a", [*ck, *gather, "--training.steps", "6"])  # Float8 again, at step 5
    assert [m["step"] for m in read_metrics(tmp_path / "a")] == [1, 2, 3, 4, 5, 6]
    step = tmp_path / "a" / "checkpoint" / "step-6"
    _dcp_to_hf(step, tmp_path / "hf")
    from_ckpt = load_pretrained(step).state_dict()
    from_hf = load_pretrained(tmp_path / "hf").state_dict()
    assert from_ckpt.keys() == from_hf.keys()
    for name, t in from_ckpt.items():
        assert type(t) is torch.Tensor and t.dtype == torch.float32, name
        torch.testing.assert_close(from_hf[name], t, rtol=0, atol=0, msg=name)


def test_mx_linear_and_grouped_mm_train_emulated(tmp_path):
    """MXFP8 (emulated) on the Linear layers of llama3 and on the routed experts of the Qwen3
    MoE debug model: each trains, and its first loss differs from the unconverted model's."""
    one = ["--training.steps", "1", "--training.local_batch_size", "4"]
    mx = ["--model.converters", "mx", "--quantize.linear.mx.recipe_name", "mxfp8_emulated_rceil"]
    two = ["--training.steps", "2", "--training.local_batch_size", "4"]
    plain, converted = train(tmp_path, "p", one), train(tmp_path, "m", [*two, *mx])
    assert converted[0] != plain[0] and converted[-1] < converted[0] + 0.5
    moe = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe"]
    grouped = [
        "--model.converters", "quantize.grouped_mm.mx", "--quantize.grouped_mm.mx.fqns", "experts",
        "--quantize.grouped_mm.mx.recipe_name", "mxfp8_emulated_rceil",
    ]  # fmt: skip
    plain, converted = (
        train(tmp_path, "qp", [*one, *moe]),
        train(tmp_path, "qm", [*two, *moe, *grouped]),
    )
    assert converted[0] != plain[0]
    log = json.dumps(converted)
    assert "nan" not in log.lower()


class _Counting(ModelConverter):
    """A plugin converter that records what the trainer did with it."""

    name = "counting"
    calls: ClassVar[list[str]] = []

    def __init__(self, config, device) -> None:
        pass

    def convert(self, model):
        devices = {p.device.type for p in model.parameters()}
        self.calls.append(f"convert on {devices}")
        return "counting: looked at the model"

    def after_optimizer_step(self, model_parts):
        self.calls.append("after step")


def test_plugin_converter_hooks_are_called(tmp_path):
    from titan_core.trainer import Trainer

    register_converter("counting", _Counting)
    _Counting.calls.clear()
    args = [*FAST, "--training.steps", "3", "--model.converters", "counting"]
    try:
        Trainer(build_config([*args, "--job.dump_folder", str(tmp_path / "run")])).train()
    finally:
        _LOCAL.pop("counting")
    assert _Counting.calls == ["convert on {'meta'}"] + ["after step"] * 3

"""Qwen3-MoE trains in titan: a torchtitan-style config loads and runs, the MoE metrics reach
every sink, the aux loss and the expert bias take part, and a resume is exact."""

from __future__ import annotations

import shutil
from importlib.resources import files

import pytest

from helpers import FAST, losses, read_metrics, run_cli

pytestmark = pytest.mark.slow

MOE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe"]
CONFIG = str(files("titan_qwen3").joinpath("configs", "qwen3_debugmodel_moe.toml"))


def test_the_torchtitan_style_moe_config_trains_with_moe_metrics(tmp_path):
    dump = tmp_path / "run"
    args = ["--job.config_file", CONFIG, "--job.dump_folder", str(dump)]
    args += ["--training.steps", "3", "--training.seq_len", "64", "--metrics.enable_tensorboard"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["moe_load_max_over_mean"] >= 1.0  # the busiest expert, over the mean
        assert 1.9 < r["aux_loss"] < 8.0  # top_k = 2 is perfect balance; 8 experts bound it
    assert "moe_load_max_over_mean" in proc.stderr and "aux_loss" in proc.stderr  # log line
    assert list((dump / "tb").iterdir())  # TensorBoard events written
    assert 0 < records[-1]["mfu"] <= 1  # counted on the active experts only


def test_expert_bias_and_aux_loss_change_training(tmp_path):
    """Both balancing mechanisms of debugmodel_moe act: the biases move from zero after a step,
    and the saved checkpoint holds them."""
    from titan_core import load_pretrained

    dump = tmp_path / "run"
    args = [*FAST, *MOE, "--training.steps", "2", "--checkpoint.enable"]
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_pretrained(dump)
    biases = [b for n, b in model.named_buffers() if n.endswith("moe.expert_bias")]
    assert len(biases) == 5 and all(b.abs().sum() > 0 for b in biases)  # layers 1-5 are MoE


def test_a_moe_run_resumes_bit_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    base = [*FAST, *MOE, "--checkpoint.enable", "--checkpoint.interval", "3"]
    proc = run_cli([*base, "--job.dump_folder", str(full)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(full / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    proc = run_cli([*base, "--job.dump_folder", str(resumed)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    assert losses(resumed) == losses(full)[3:]  # the expert biases resume too

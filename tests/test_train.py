"""End-to-end training on the embedded default data, outputs, and refusals of bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from helpers import read_metrics, run_cli
from titan_core.train import run

METRIC_KEYS = {
    "step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu", "memory_gib", "tokens_seen", "time",
    "total_steps", "eta_s", "data_wait_s",
}  # fmt: skip


@pytest.mark.slow
def test_debugmodel_learns_on_embedded_data(tmp_path):
    dump = tmp_path / "run"
    summary = run(
        [
            "--job.dump_folder",
            str(dump),
            "--training.steps",
            "40",
            "--training.seq_len",
            "128",
            "--metrics.log_freq",
            "5",
        ]
    )
    records = read_metrics(dump)
    assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert records[0]["loss"] - records[-1]["loss"] > 1.0
    assert summary["final_loss"] == records[-1]["loss"]
    for r in records:
        assert set(r) == METRIC_KEYS
        assert r["tps"] > 0 and 0 < r["mfu"] < 1 and r["memory_gib"] > 0
    assert records[-1]["tokens_seen"] == 40 * 8 * 128
    # The resolved config is saved and reads back.
    saved = tomllib.loads((dump / "config.toml").read_text())
    assert saved["training"]["steps"] == 40 and saved["model"]["flavor"] == "debugmodel"
    assert any((dump / "tb").iterdir())


def test_bf16_on_cpu_tracks_fp32(tmp_path):
    """CPU twin of the GPU's default bf16 path (autocast in one process)."""
    args = ["--training.steps", "2", "--training.seq_len", "32", "--metrics.log_freq", "1"]
    args += ["--metrics.no_enable_tensorboard"]
    fp32 = run(
        [
            *args,
            "--job.dump_folder",
            str(tmp_path / "a"),
            "--training.mixed_precision_param",
            "float32",
        ]
    )
    bf16 = run(
        [
            *args,
            "--job.dump_folder",
            str(tmp_path / "b"),
            "--training.mixed_precision_param",
            "bfloat16",
        ]
    )
    assert bf16["first_loss"] != fp32["first_loss"]  # bf16 really ran
    assert bf16["first_loss"] == pytest.approx(fp32["first_loss"], rel=1e-2)


def test_new_run_keeps_the_previous_runs_files(tmp_path):
    dump = tmp_path / "run"
    args = ["--job.dump_folder", str(dump), "--training.steps", "1", "--training.seq_len", "32"]
    run([*args, "--metrics.no_enable_tensorboard"])
    first = (dump / "metrics.jsonl").read_text()
    run([*args, "--metrics.no_enable_tensorboard"])
    archived = list((dump / "previous-runs").glob("*/metrics.jsonl"))
    assert len(archived) == 1 and archived[0].read_text() == first
    assert len((dump / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--training.stpes", "3"], "training.stpes"),
        (["--model.name", "gpt9"], "no model 'gpt9' is installed (installed: llama3"),
        (["--model.flavor", "7B"], "model.flavor: '7B' is not a flavor of llama3"),
        (["--model.hf_assets_path", "/nonexistent/tok"], "model.hf_assets_path"),
        (["--training.dataset_path", "/nonexistent/data.jsonl"], "training.dataset_path"),
        (["--parallelism.data_parallel_shard_degree", "2"], "the world size is 1"),
        (["--parallelism.tensor_parallel_degree", "2"], "tensor_parallel_degree"),
        (["--training.global_batch_size", "12"], "training.global_batch_size=12"),
        (["--job.config_file", "/nonexistent.toml"], "job.config_file"),
        (
            [
                "--activation_checkpoint.mode",
                "selective",
                "--activation_checkpoint.selective_ac_option",
                "some",
            ],
            "activation_checkpoint.selective_ac_option='some'",
        ),
        (
            ["--activation_checkpoint.mode", "partial"],
            "--activation_checkpoint.mode: expected one of",
        ),
        (["--compile.components", "model,optimizer"], "compile.components: unknown ['optimizer']"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, args, needle):
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text('{"step": 1}\n')
    (dump / "config.toml").write_text("# earlier run\n")
    proc = run_cli(["--job.dump_folder", str(dump), *args])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("titan-train: error: "), proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in dump.iterdir()) == ["config.toml", "metrics.jsonl"]
    assert (dump / "config.toml").read_text() == "# earlier run\n"


def test_empty_dataset_file_is_refused(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = run_cli(["--job.dump_folder", str(tmp_path / "o"), "--training.dataset_path", str(data)])
    assert proc.returncode == 2 and "training.dataset_path" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_debug_flag_shows_the_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "titan_core.train", "--training.steps", "x"],
        capture_output=True,
        text=True,
        env={**os.environ, "TITAN_DEBUG": "1"},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_help_and_list_models():
    proc = run_cli(["--help"])
    assert proc.returncode == 0 and "--training.global_batch_size" in proc.stdout
    proc = run_cli(["--list-models"])
    assert proc.returncode == 0 and "llama3" in proc.stdout and "debugmodel" in proc.stdout


def test_console_script_is_the_same_entry_point():
    proc = subprocess.run(["titan-train", "--list-models"], capture_output=True, text=True)
    assert proc.returncode == 0 and "llama3" in proc.stdout

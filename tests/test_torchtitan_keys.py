"""torchtitan v0.2 keys: job.print_config, metrics.save_tb_folder/disable_color_printing,
checkpoint.export_dtype float16, [debug], and --version."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import FAST, read_metrics, run_cli
from titan_convert.cli import main as convert_main
from titan_core import load_pretrained
from titan_core.config import build_config
from titan_core.determinism import resolve_debug, set_determinism
from titan_core.errors import UserError
from titan_core.metrics import format_console_line
from titan_core.train import main, run

SHORT = [*FAST, "--training.steps", "2"]


def test_print_config_a_custom_tb_folder_and_no_colour_when_piped(tmp_path):
    dump = tmp_path / "run"
    args = ["--job.print_config", "--metrics.enable_tensorboard", "--metrics.save_tb_folder", "tbx"]
    proc = run_cli([*SHORT, *args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\n[training]\n" in proc.stderr
    assert "\x1b[" not in proc.stderr + proc.stdout
    assert any(p.name.startswith("events.out.tfevents") for p in (dump / "tbx").iterdir())
    assert not (dump / "tb").exists()


def test_console_lines_are_coloured_only_on_request():
    record = {"step": 3, "loss": 1.5, "lr": 1e-3}
    assert "\x1b[" not in format_console_line(record)
    coloured = format_console_line(record, color=True)
    assert "\x1b[" in coloured and "1.5000" in coloured


def test_an_empty_tb_folder_is_refused(tmp_path):
    argv = [*SHORT, "--metrics.enable_tensorboard", "--metrics.save_tb_folder", ""]
    with pytest.raises(UserError, match=r"metrics\.save_tb_folder"):
        run([*argv, "--job.dump_folder", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_a_float16_model_only_export_holds_float16_tensors(tmp_path):
    dump = tmp_path / "run"
    ckpt = ["--checkpoint.enable", "--checkpoint.last_save_model_only"]
    run([*SHORT, *ckpt, "--checkpoint.export_dtype", "float16", "--job.dump_folder", str(dump)])
    final = dump / "checkpoint" / "step-2"
    assert json.loads((final / "titan.json").read_text())["dtype"] == "float16"
    stored = dcp.FileSystemReader(str(final)).read_metadata().state_dict_metadata
    dtypes = {m.properties.dtype for k, m in stored.items() if k.startswith("model.")}
    assert dtypes == {torch.float16}
    assert all(torch.isfinite(t).all() for t in load_pretrained(final).state_dict().values())


def test_debug_keys_are_torchtitans_spelling_of_the_training_keys():
    config = build_config(["--debug.seed", "7", "--debug.deterministic_warn_only"])
    resolve_debug(config)
    assert config.training.seed == 7 and config.training.deterministic
    config = build_config(["--debug.deterministic"])
    resolve_debug(config)
    assert config.training.deterministic and config.training.seed == 0
    config = build_config(["--training.seed", "7", "--debug.seed", "7"])
    resolve_debug(config)  # the same value under both names is fine
    assert config.training.seed == 7


def test_two_different_seeds_are_refused_naming_both_keys(tmp_path):
    proc = run_cli(
        [*SHORT, "--training.seed", "1", "--debug.seed", "2", "--job.dump_folder", str(tmp_path)]
    )
    assert proc.returncode == 2
    assert "debug.seed=2 and training.seed=1 disagree" in proc.stderr.strip().splitlines()[-1]


def test_deterministic_warn_only_only_warns():
    config = build_config(["--debug.deterministic_warn_only"])
    resolve_debug(config)
    try:
        set_determinism(config)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_titan_train_version(capsys):
    assert main(["--version"]) == 0
    assert (
        capsys.readouterr().out.strip() == f"titan-train {importlib.metadata.version('titan-core')}"
    )


def test_titan_convert_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--version"])
    assert exit_info.value.code == 0
    expected = f"titan-convert {importlib.metadata.version('titan-convert')}"
    assert capsys.readouterr().out.strip() == expected


def test_moe_force_load_balance_routes_round_robin(tmp_path):
    """debug.moe_force_load_balance: every expert gets the same number of tokens (the load
    metric is exactly 1), where score routing is uneven; a dense model refuses the key."""
    from titan_core.models.moe.router import round_robin_experts

    experts = round_robin_experts(5, 3, 4, torch.device("cpu"))
    assert experts.tolist() == [[0, 1, 2], [3, 0, 1], [2, 3, 0], [1, 2, 3], [0, 1, 2]]
    moe = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe"]
    loads = {}
    for name, extra in (("scores", []), ("forced", ["--debug.moe_force_load_balance"])):
        dump = tmp_path / name
        proc = run_cli([*SHORT, *moe, *extra, "--job.dump_folder", str(dump)])
        assert proc.returncode == 0, proc.stderr[-2000:]
        loads[name] = [m["moe_load_max_over_mean"] for m in read_metrics(dump)]
    assert loads["forced"] == [1.0, 1.0] and all(x > 1.0 for x in loads["scores"])
    proc = run_cli([*SHORT, "--debug.moe_force_load_balance", "--job.dump_folder", str(tmp_path)])
    assert proc.returncode == 2 and "debug.moe_force_load_balance" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

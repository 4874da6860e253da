"""Numbers that cannot be right, and dump folders that cannot hold a run, are refused up front:
one line on stderr, exit 2, no traceback, and the dump folder byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from titan_core.train import main


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes (folders as empty entries)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else ""
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def earlier_run(tmp_path):
    """A dump folder holding an earlier run's files, which a refused run must not move."""
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "config.toml").write_text("[job]\ndescription = 'earlier'\n")
    (dump / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    (dump / "checkpoint").mkdir()
    return dump


def refuse(argv: list[str], capsys) -> str:
    """Run titan-train in-process; assert a one-line refusal with exit 2 and return the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("titan-train: error: ")
    return err


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--training.max_norm", "-1", "must be >= 0"),  # was: silent gradient ascent
        ("--training.max_norm", "nan", "not a finite number"),
        ("--optimizer.lr", "-0.001", "must be > 0"),
        ("--optimizer.lr", "0", "must be > 0"),
        ("--optimizer.lr", "inf", "not a finite number"),
        ("--optimizer.beta1", "1", "must be in [0, 1)"),
        ("--optimizer.beta2", "-0.5", "must be in [0, 1)"),
        ("--optimizer.eps", "0", "must be > 0"),
        ("--optimizer.weight_decay", "-0.1", "must be >= 0"),
        ("--training.seed", str(2**64), "does not fit in a 64-bit integer"),
        ("--training.seed", "-1", "must be in [0, 9223372036854775807]"),
        ("--lr_scheduler.min_lr_factor", "1.5", "must be in [0, 1]"),
        ("--optimizer.name", "SGD", "is not one of AdamW, Adam"),  # checked before the folder
    ],
)
def test_impossible_numbers_are_refused_before_the_dump_folder_is_touched(
    earlier_run, capsys, flag, value, needle
):
    before = snapshot(earlier_run)
    err = refuse(["--job.dump_folder", str(earlier_run), f"{flag}={value}"], capsys)
    assert flag.removeprefix("--") in err and needle in err
    assert snapshot(earlier_run) == before  # nothing moved to previous-runs/, nothing written


def test_a_toml_infinity_is_refused_naming_the_file_and_key(earlier_run, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[optimizer]\nlr = inf\n")
    before = snapshot(earlier_run)
    err = refuse(["--job.config_file", str(config), "--job.dump_folder", str(earlier_run)], capsys)
    assert f"{config}: [optimizer] lr: inf is not a finite number" in err
    assert snapshot(earlier_run) == before


def test_an_empty_dump_folder_is_refused_and_the_current_folder_left_alone(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text("mine\n")  # a user's file in the current folder
    before = snapshot(tmp_path)
    err = refuse(["--job.dump_folder", ""], capsys)
    assert "job.dump_folder: empty" in err
    assert snapshot(tmp_path) == before


def test_a_dump_folder_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    err = refuse(["--job.dump_folder", str(tmp_path / "notes.txt" / "run")], capsys)
    assert "is a file, not a folder" in err


def test_a_dump_folder_that_cannot_be_written_is_refused(capsys):
    # NOTE: tests run as root, whom permission bits do not stop; /proc/sys refuses new files to
    # everyone. Writing config.toml there raised a traceback before.
    target = "/proc/sys"
    if not Path(target).is_dir() or os.access(target, os.W_OK):
        pytest.skip(f"{target} is not a read-only folder on this machine")
    err = refuse(["--job.dump_folder", target], capsys)
    assert "job.dump_folder: /proc/sys is not writable" in err


# Each CLI with an argv its parser accepts; what runs after parsing is replaced by a refusal.
CLIS = {
    "titan_core.plan.cli": ["--gpu", "h100"],
    "titan_core.generate_cli": ["model", "--prompt", "x"],
    "titan_core.evaluate_cli": ["model", "--text-file", "t.txt"],
    "titan_convert.cli": ["hf-to-dcp", "in", "out"],
}


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_cli_reports_bad_input_in_one_line_or_a_traceback_on_debug(cli, monkeypatch, capsys):
    """The CLIs share one reporter: ``PROG: error: ...``, exit 2; TITAN_DEBUG=1 raises."""
    import importlib

    from titan_core.errors import UserError

    module = importlib.import_module(cli)

    def refuse(*args, **kwargs):
        raise UserError("some.key: a bad value; use a good one")

    for name in ("run", "run_perplexity", "_check_flags"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.delenv("TITAN_DEBUG", raising=False)
    assert module.main(CLIS[cli]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("titan-") and "\n" not in err
    assert err.endswith(": error: some.key: a bad value; use a good one")
    monkeypatch.setenv("TITAN_DEBUG", "1")
    with pytest.raises(UserError, match=r"some\.key"):
        module.main(CLIS[cli])

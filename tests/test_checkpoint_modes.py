"""Checkpoint modes: async saves, model-only export, partial loading, starting from a checkpoint."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import FAST, losses, read_metrics, run_cli
from titan_core import load_pretrained
from titan_core.checkpoint import complete_steps
from titan_core.train import run

CKPT = ["--checkpoint.enable", "--training.local_batch_size", "8"]


def train(dump: Path, *extra: str) -> None:
    """One in-process run of 8 steps (unless ``extra`` says otherwise) with checkpoints on."""
    run([*FAST, *CKPT, *extra, "--job.dump_folder", str(dump)])


def refusal(tmp_path: Path, *extra: str) -> str:
    """Run the CLI with bad flags: assert exit code 2 and an untouched dump folder."""
    proc = run_cli([*FAST, *extra, "--job.dump_folder", str(tmp_path / "x")])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not (tmp_path / "x").exists()
    return proc.stderr


def ckpt_folder(dump: Path) -> Path:
    return dump / "checkpoint"


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory) -> Path:
    """8 steps, blocking saves every 2 steps."""
    dump = tmp_path_factory.mktemp("sync")
    run([*FAST, *CKPT, "--checkpoint.interval", "2", "--job.dump_folder", str(dump)])
    return dump


@pytest.fixture(scope="module")
def async_run(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("async")
    train(dump, "--checkpoint.interval", "2", "--checkpoint.async_mode", "async")
    return dump


def test_async_saves_change_nothing_and_report_their_blocking_time(sync_run, async_run):
    assert losses(async_run) == losses(sync_run)
    assert complete_steps(ckpt_folder(async_run)) == [2, 4, 6, 8]
    blocking = {r["step"]: r.get("checkpoint_blocking_s") for r in read_metrics(async_run)}
    assert all(blocking[s] is not None and blocking[s] >= 0 for s in (2, 4, 6, 8))
    assert blocking[1] is None and blocking[3] is None  # only save steps carry it


def test_an_async_checkpoint_resumes_exactly(sync_run, async_run, tmp_path):
    dump = tmp_path / "resumed"
    shutil.copytree(async_run, dump)
    for step in (6, 8):
        shutil.rmtree(ckpt_folder(dump) / f"step-{step}")
    lines = (dump / "metrics.jsonl").read_text().splitlines(keepends=True)[:4]
    (dump / "metrics.jsonl").write_text("".join(lines))
    run([*FAST, *CKPT, "--checkpoint.interval", "2", "--job.dump_folder", str(dump)])
    assert losses(dump) == losses(sync_run)


def test_training_goes_on_while_an_async_save_writes(tmp_path, monkeypatch, caplog):
    """The storage of step 2's save does not finish writing until step 3 has been logged: an
    asynchronous save lets training reach step 3 meanwhile; a save that blocked training would
    wait out the timeout and report completion before step 3. (No timing: a loaded machine
    cannot make this pass or fail.)"""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    step3_logged = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if re.match(r"step\s+3/", record.getMessage()):
                step3_logged.set()

    slow_write = FileSystemWriter.write_data

    def write_data(self, plan, planner):
        step3_logged.wait(timeout=120)
        return slow_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    caplog.set_level(logging.INFO, logger="titan")
    watch = Watch()
    logging.getLogger("titan").addHandler(watch)
    dump = tmp_path / "slow"
    try:
        train(
            str(dump),
            "--checkpoint.interval",
            "2",
            "--checkpoint.async_mode",
            "async",
            "--training.steps",
            "4",
            "--metrics.log_freq",
            "1",
        )
    finally:
        logging.getLogger("titan").removeHandler(watch)
    messages = [r.getMessage() for r in caplog.records]
    copied = next(i for i, m in enumerate(messages) if "step-2: state copied" in m)
    complete = next(i for i, m in enumerate(messages) if "step-2 complete" in m)
    step3 = next(i for i, m in enumerate(messages) if re.match(r"step\s+3/", m))
    assert copied < step3 < complete, messages
    assert complete_steps(ckpt_folder(dump)) == [2, 4]


def test_one_process_checkpointing_prints_no_torch_distributed_warning(tmp_path):
    """DCP warns that torch.distributed is off at every save and load of a one-process run."""
    dump = tmp_path / "quiet"
    args = [*FAST, *CKPT, "--checkpoint.interval", "2", "--job.dump_folder", str(dump)]
    first = run_cli([*args, "--training.steps", "2", "--checkpoint.async_mode", "async"])
    resumed = run_cli([*args, "--training.steps", "4"])  # loads step 2, saves step 4
    for proc in (first, resumed):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "torch.distributed is disabled" not in proc.stderr, proc.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert complete_steps(ckpt_folder(dump)) == [2, 4]


def test_pinned_memory_async_saves_are_refused_on_cpu(tmp_path):
    stderr = refusal(
        tmp_path, "--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem"
    )
    assert "checkpoint.async_mode=async_with_pinned_mem needs CUDA" in stderr


def test_the_last_save_can_be_a_bfloat16_export_that_loads_and_is_not_resumed(
    sync_run, tmp_path, caplog
):
    dump = tmp_path / "export"
    args = [*FAST, *CKPT, "--checkpoint.interval", "4", "--job.dump_folder", str(dump)]
    run([*args, "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bfloat16"])
    assert losses(dump) == losses(sync_run)
    final = ckpt_folder(dump) / "step-8"
    meta = json.loads((final / "titan.json").read_text())
    assert meta["model_only"] and meta["dtype"] == "bfloat16"
    stored = dcp.FileSystemReader(str(final)).read_metadata().state_dict_metadata
    assert not any(k.startswith("optimizer.") for k in stored)
    dtypes = {m.properties.dtype for k, m in stored.items() if k.startswith("model.")}
    assert dtypes == {torch.bfloat16}
    # The export holds the final weights, rounded to bfloat16.
    full = load_pretrained(ckpt_folder(sync_run) / "step-8")
    exported = load_pretrained(final)
    for (name, a), (_, b) in zip(
        full.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert torch.equal(a.bfloat16().float(), b), name
    # A longer run resumes from the last full checkpoint, not from the export.
    caplog.set_level(logging.WARNING, logger="titan")
    run([*args, "--training.steps", "10"])
    assert any("model-only export" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(dump)][-6:] == [5, 6, 7, 8, 9, 10]


def test_excluding_every_part_from_loading_restarts_training(sync_run, tmp_path):
    dump = tmp_path / "excluded"
    shutil.copytree(sync_run, dump)
    parts = "model,optimizer,lr_scheduler,dataloader,rng"
    train(
        str(dump),
        "--checkpoint.interval",
        "2",
        "--training.steps",
        "9",
        "--checkpoint.exclude_from_loading",
        parts,
    )
    # Step 9 starts from nothing of step 8: it is step 1 of a fresh run.
    assert losses(dump)[-1] == losses(sync_run)[0]
    assert losses(dump)[-1] != losses(sync_run)[-1]


def test_an_unknown_part_to_exclude_is_refused(tmp_path):
    stderr = refusal(
        tmp_path, "--checkpoint.enable", "--checkpoint.exclude_from_loading", "model,weights"
    )
    assert "checkpoint.exclude_from_loading: unknown ['weights']" in stderr


def test_initial_load_path_with_full_state_continues_the_run(sync_run, tmp_path):
    dump = tmp_path / "fresh"
    train(
        str(dump),
        "--checkpoint.interval",
        "2",
        "--checkpoint.initial_load_path",
        str(ckpt_folder(sync_run) / "step-4"),
        "--checkpoint.no_initial_load_model_only",
    )
    assert [r["step"] for r in read_metrics(dump)] == [5, 6, 7, 8]
    assert losses(dump) == losses(sync_run)[4:]


def test_initial_load_path_model_only_starts_from_its_weights(sync_run, tmp_path):
    seed = tmp_path / "seed"
    run([*FAST, "--checkpoint.create_seed_checkpoint", "--job.dump_folder", str(seed)])
    from_seed = tmp_path / "from-seed"
    shutil.copytree(seed, from_seed)
    run([*FAST, *CKPT, "--job.dump_folder", str(from_seed)])  # auto-resumes from step-0
    dump = tmp_path / "initial"
    train(dump, "--checkpoint.initial_load_path", str(ckpt_folder(seed)))
    assert losses(dump) == losses(from_seed)
    # The trained weights of step 4: not the start of a fresh run.
    trained = tmp_path / "trained"
    train(trained, "--checkpoint.initial_load_path", str(ckpt_folder(sync_run) / "step-4"))
    assert losses(trained)[0] < losses(sync_run)[0] - 0.1


def test_a_missing_initial_load_path_is_refused_before_work(tmp_path):
    stderr = refusal(tmp_path, "--checkpoint.initial_load_path", str(tmp_path / "nope"))
    assert "checkpoint.initial_load_path:" in stderr and "does not exist" in stderr


@pytest.mark.distributed
def test_async_saves_under_fsdp_resume_exactly(sync_run, tmp_path):
    dump = tmp_path / "fsdp"
    args = [*FAST, "--checkpoint.enable", "--checkpoint.interval", "2"]
    args += ["--checkpoint.async_mode", "async", "--training.local_batch_size", "4"]
    proc = run_cli([*args, "--job.dump_folder", str(dump)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert complete_steps(ckpt_folder(dump)) == [2, 4, 6, 8]
    assert losses(dump) == pytest.approx(losses(sync_run), rel=1e-5, abs=0)
    resumed = tmp_path / "resumed"
    shutil.copytree(dump, resumed)
    for step in (6, 8):
        shutil.rmtree(ckpt_folder(resumed) / f"step-{step}")
    lines = (resumed / "metrics.jsonl").read_text().splitlines(keepends=True)[:4]
    (resumed / "metrics.jsonl").write_text("".join(lines))
    proc = run_cli([*args, "--job.dump_folder", str(resumed)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(resumed) == losses(dump)

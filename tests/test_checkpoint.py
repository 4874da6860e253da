"""Checkpoints: exact resume, resume across layouts, crash safety, retention, refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from helpers import FAST, losses, read_metrics, run_cli
from titan_core import register_train_spec
from titan_core.errors import UserError
from titan_core.train import run

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "4", "--training.global_batch_size", "8"]


def uninterrupted(tmp_path_factory) -> Path:
    dump = tmp_path_factory.mktemp("full")
    run([*FAST, *CKPT, "--training.local_batch_size", "8", "--job.dump_folder", str(dump)])
    return dump


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """8 steps in one process, checkpoints at steps 4 and 8."""
    return uninterrupted(tmp_path_factory)


def stopped_at_4(source: Path, target: Path) -> Path:
    """The state a run stopped right after step 4 leaves: step-4 only, metrics up to step 4."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoint" / "step-8")
    lines = (target / "metrics.jsonl").read_text().splitlines(keepends=True)[:4]
    (target / "metrics.jsonl").write_text("".join(lines))
    return target


def test_resume_on_the_same_layout_is_bit_identical(full_run, tmp_path):
    dump = stopped_at_4(full_run, tmp_path / "resumed")
    run([*FAST, *CKPT, "--training.local_batch_size", "8", "--job.dump_folder", str(dump)])
    records = read_metrics(dump)
    assert [r["step"] for r in records] == list(range(1, 9))  # appended, not restarted
    assert losses(dump) == losses(full_run)  # exact float equality


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc, extra",
    [
        (4, ["--training.local_batch_size", "2"]),  # FSDP 4 (a DP-degree change)
        (4, ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2"]),
        (4, ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"]),
    ],
    ids=["to-fsdp4", "to-tp2-fsdp2", "to-pp2-fsdp2"],
)
def test_a_one_process_checkpoint_resumes_under_other_layouts(full_run, tmp_path, nproc, extra):
    dump = stopped_at_4(full_run, tmp_path / "resumed")
    proc = run_cli([*FAST, *CKPT, *extra, "--job.dump_folder", str(dump)], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(dump)[4:] == pytest.approx(losses(full_run)[4:], rel=1e-5, abs=0)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "extra",
    [
        ["--training.local_batch_size", "2"],
        ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    ],
    ids=["from-fsdp4", "from-pp2-fsdp2"],
)
def test_a_sharded_checkpoint_resumes_in_one_process(full_run, tmp_path, extra):
    dump = tmp_path / "sharded"
    proc = run_cli([*FAST, *CKPT, *extra, "--job.dump_folder", str(dump)], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = stopped_at_4(dump, tmp_path / "resumed")
    run([*FAST, *CKPT, "--training.local_batch_size", "8", "--job.dump_folder", str(resumed)])
    assert losses(resumed) == pytest.approx(losses(full_run), rel=1e-5, abs=0)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(full_run, tmp_path, caplog):
    dump = tmp_path / "corrupt"
    shutil.copytree(full_run, dump)
    shard = next((dump / "checkpoint" / "step-8").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    lines = (dump / "metrics.jsonl").read_text().splitlines(keepends=True)[:4]
    (dump / "metrics.jsonl").write_text("".join(lines))
    with caplog.at_level("WARNING", logger="titan"):
        run([*FAST, *CKPT, "--training.local_batch_size", "8", "--job.dump_folder", str(dump)])
    assert any("step-8 is corrupt" in r.getMessage() for r in caplog.records)
    assert losses(dump) == losses(full_run)  # resumed from step 4, exactly


def test_a_checkpoint_without_metadata_is_not_complete(full_run, tmp_path):
    from titan_core.checkpoint import complete_steps

    dump = tmp_path / "nometa"
    shutil.copytree(full_run, dump)
    (dump / "checkpoint" / "step-8" / ".metadata").unlink()
    assert complete_steps(dump / "checkpoint") == [4]
    # A partial folder left by a crash during a save is not a checkpoint either.
    (dump / "checkpoint" / ".step-12.partial").mkdir()
    assert complete_steps(dump / "checkpoint") == [4]


def test_load_step_that_does_not_exist_lists_the_available_ones(full_run, tmp_path):
    dump = tmp_path / "copy"
    shutil.copytree(full_run, dump)
    proc = run_cli([*FAST, *CKPT, "--checkpoint.load_step", "5", "--job.dump_folder", str(dump)])
    assert proc.returncode == 2
    assert "checkpoint.load_step=5" in proc.stderr and "available: 4, 8" in proc.stderr


def test_keep_latest_k_keeps_exactly_k(tmp_path):
    from titan_core.checkpoint import complete_steps

    dump = tmp_path / "keep"
    args = [
        *FAST,
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--checkpoint.keep_latest_k",
        "2",
    ]
    run([*args, "--job.dump_folder", str(dump)])
    assert complete_steps(dump / "checkpoint") == [6, 8]


def test_a_checkpoint_of_another_flavor_is_refused_with_the_differences(tmp_path):
    from titan_llama3 import LLAMA3_FLAVORS, train_spec

    debug = LLAMA3_FLAVORS["debugmodel"]
    flavors = {"small": debug, "wide": dataclasses.replace(debug, dim=128, n_heads=8, n_kv_heads=4)}
    register_train_spec(dataclasses.replace(train_spec, name="llama3-two-sizes", flavors=flavors))
    args = [
        *FAST,
        "--training.steps",
        "2",
        "--checkpoint.enable",
        "--model.name",
        "llama3-two-sizes",
    ]
    dump = str(tmp_path / "run")
    run([*args, "--model.flavor", "small", "--job.dump_folder", dump])
    with pytest.raises(UserError) as e:
        run([*args, "--model.flavor", "wide", "--training.steps", "4", "--job.dump_folder", dump])
    message = str(e.value)
    assert "holds llama3-two-sizes small" in message
    assert "layers.0.attention.wk.weight: checkpoint (128, 256) vs model (64, 128)" in message
    assert "and 52 more" in message and "\n" not in message


def _start(args: list[str]):
    import os
    import subprocess
    import sys

    from helpers import REPO

    cmd = [sys.executable, "-m", "titan_core.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "saving"])
def test_kill_9_then_rerun_continues_the_same_run(full_run, tmp_path, when):
    import random
    import time

    dump = tmp_path / "killed"
    args = [*FAST, *CKPT, "--checkpoint.interval", "2", "--training.local_batch_size", "8"]
    args += ["--job.dump_folder", str(dump)]
    stop_after = random.Random().randint(3, 7)  # a step, or the save after it
    proc = _start(args)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            logged = (
                (dump / "metrics.jsonl").read_text().count("\n")
                if (dump / "metrics.jsonl").exists()
                else 0
            )
            partial = any((dump / "checkpoint").glob(".step-*.partial"))
            if logged >= stop_after and (when == "training" or partial):
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed (step {stop_after})"
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    summary = run(args)  # the rerun resumes from the newest complete checkpoint
    assert summary["final_loss"] == losses(full_run)[-1]
    latest = {r["step"]: r["loss"] for r in read_metrics(dump)}  # re-logged steps: the last wins
    assert [latest[s] for s in range(1, 9)] == losses(full_run)


def test_load_pretrained_returns_the_checkpointed_weights(full_run, tmp_path):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from titan_core import load_pretrained

    model = load_pretrained(full_run)  # the dump folder: newest complete checkpoint (step 8)
    assert not model.training
    # Read the same checkpoint with torch's own converter and compare every tensor.
    flat = tmp_path / "flat.pt"
    dcp_to_torch_save(str(full_run / "checkpoint" / "step-8"), str(flat))
    saved = torch.load(flat, weights_only=True)["model"]
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    tokens = torch.randint(0, 2048, (2, 16))
    assert model(tokens).shape == (2, 16, 2048)
    with pytest.raises(UserError, match="not a titan checkpoint"):
        load_pretrained(tmp_path)


@pytest.mark.distributed
def test_a_seed_checkpoint_gives_every_layout_the_same_start(tmp_path):
    seed = ["--checkpoint.create_seed_checkpoint", "--training.seed", "5"]
    run([*FAST, *seed, "--job.dump_folder", str(tmp_path / "seed")])
    assert (tmp_path / "seed" / "checkpoint" / "step-0").is_dir()
    for name in ("one", "pp"):
        shutil.copytree(tmp_path / "seed", tmp_path / name)
    train = [*FAST, *CKPT, "--training.local_batch_size", "8", "--training.seed", "0"]
    run([*train, "--job.dump_folder", str(tmp_path / "one")])
    run([*train, "--job.dump_folder", str(tmp_path / "fresh")])  # no seed checkpoint
    pp = [*FAST, *CKPT, "--training.local_batch_size", "4", "--training.seed", "0"]
    pp += ["--parallelism.pipeline_parallel_degree", "2", "--job.dump_folder", str(tmp_path / "pp")]
    proc = run_cli(pp, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=0)
    # The weights came from the seed checkpoint (training.seed 5), not from training.seed 0.
    assert losses(tmp_path / "one")[0] != losses(tmp_path / "fresh")[0]
    # Asking for a seed checkpoint again in a folder with checkpoints is refused.
    with pytest.raises(UserError, match="already holds checkpoints"):
        run([*FAST, *seed, "--job.dump_folder", str(tmp_path / "one")])

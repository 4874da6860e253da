"""What titan refuses to read from a checkpoint, and checkpoint folders that are not what they
seem: no code runs from a checkpoint, and a bad folder is refused before anything is written."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAST, run_cli
from titan_core import load_pretrained, register_train_spec
from titan_core.errors import UserError
from titan_core.train import run

TINY = [*FAST, "--training.seq_len", "32", "--training.local_batch_size", "2"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "1"]


class Payload:
    """Unpickling this creates ``marker``: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A dump folder with complete checkpoints step-1 and step-2."""
    dump = tmp_path_factory.mktemp("two-steps")
    run([*TINY, *CKPT, "--training.steps", "2", "--job.dump_folder", str(dump)])
    return dump


def copy_of(two_steps: Path, tmp_path: Path) -> Path:
    dump = tmp_path / "dump"
    shutil.copytree(two_steps, dump)
    return dump


def tree_hash(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its bytes' digest ('dir' for folders)."""
    return {
        str(p.relative_to(folder)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---- no code runs from a checkpoint ------------------------------------------------------


def test_a_pickled_payload_in_metadata_never_runs(two_steps, tmp_path, capsys):
    from titan_convert.cli import main as convert

    dump = copy_of(two_steps, tmp_path)
    step = dump / "checkpoint" / "step-2"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    before = tree_hash(dump)

    # Resume: one line, exit 2, before the dump folder is touched.
    proc = run_cli([*TINY, *CKPT, "--training.steps", "3", "--job.dump_folder", str(dump)])
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{step}/.metadata" in line and "io.open" in line and "refusing to run code" in line
    assert not marker.exists() and tree_hash(dump) == before

    # The checkpoint as checkpoint.initial_load_path of a new run.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    args = [*TINY, *CKPT, "--job.dump_folder", str(fresh)]
    with pytest.raises(UserError, match="refusing to run code"):
        run([*args, "--checkpoint.initial_load_path", str(step)])
    assert not marker.exists() and not any(fresh.iterdir())

    # titan-convert dcp-to-hf: exit 2, no output folder.
    capsys.readouterr()
    assert convert(["dcp-to-hf", str(step), str(tmp_path / "hf")]) == 2
    assert "refusing to run code" in one_line(capsys.readouterr().err)
    assert not marker.exists() and not (tmp_path / "hf").exists()

    with pytest.raises(UserError, match="refusing to run code"):
        load_pretrained(step)
    assert not marker.exists() and tree_hash(dump) == before


def test_a_tensor_stored_as_pickled_bytes_is_never_unpickled(two_steps, tmp_path):
    """DCP's default planner would torch.load(weights_only=False) a BytesStorageMetadata entry."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    step = copy_of(two_steps, tmp_path) / "checkpoint" / "step-2"
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    (step / "payload.distcp").write_bytes(payload.getvalue())
    with open(step / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own checkpoint: safe to unpickle here
    metadata.state_dict_metadata["model.norm.weight"] = BytesStorageMetadata()
    info = _StorageInfo("payload.distcp", 0, len(payload.getvalue()))
    metadata.storage_data[MetadataIndex("model.norm.weight")] = info
    (step / ".metadata").write_bytes(pickle.dumps(metadata))

    with pytest.raises(UserError, match=r"model\.norm\.weight as a pickled object, not a tensor"):
        load_pretrained(step)
    assert not marker.exists()

    # A shard path outside the checkpoint's folder is refused too.
    metadata.storage_data[MetadataIndex("model.norm.weight")] = _StorageInfo("../x", 0, 1)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UserError, match="a shard path outside its folder"):
        load_pretrained(step)


# ---- checkpoint folders that are not what they seem -------------------------------------


def test_a_file_where_a_checkpoint_goes_is_refused_up_front(two_steps, tmp_path):
    from titan_core.checkpoint import resume_candidates

    dump = copy_of(two_steps, tmp_path)
    (dump / "checkpoint" / "step-3").write_text("not a checkpoint")
    before = tree_hash(dump)
    proc = run_cli([*TINY, *CKPT, "--training.steps", "3", "--job.dump_folder", str(dump)])
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert f"{dump}/checkpoint/step-3 is not a folder" in line and "move it away" in line
    assert tree_hash(dump) == before

    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        resume_candidates(tmp_path / "file", -1)


def test_a_damaged_titan_json_falls_back_to_the_previous_checkpoint(two_steps, tmp_path, caplog):
    dump = copy_of(two_steps, tmp_path)
    ckpt = dump / "checkpoint"
    (ckpt / "step-2" / "titan.json").write_text("{not json")
    with caplog.at_level("INFO", logger="titan"):
        summary = run([*TINY, *CKPT, "--training.steps", "3", "--job.dump_folder", str(dump)])
    assert summary["steps"] == 3
    warned = [r.getMessage() for r in caplog.records if "step-2 is corrupt" in r.getMessage()]
    assert len(warned) == 1 and "trying an older one" in warned[0]
    assert "resumed from" in caplog.text and f"{ckpt / 'step-1'}" in caplog.text
    # The damaged step-2 is kept aside, not deleted, when the run saves step 2 again.
    (aside,) = ckpt.glob("step-2.replaced-*")
    assert (aside / "titan.json").read_text() == "{not json"

    # With no older checkpoint left: one line.
    for step in ckpt.glob("step-*"):
        shutil.rmtree(step)
    shutil.copytree(two_steps / "checkpoint" / "step-1", ckpt / "step-1")
    (ckpt / "step-1" / "titan.json").write_text("[]")
    with pytest.raises(UserError, match="step-1 cannot be loaded") as e:
        run([*TINY, *CKPT, "--training.steps", "3", "--job.dump_folder", str(dump)])
    assert "\n" not in str(e.value)
    fresh = [*TINY, "--job.dump_folder", str(tmp_path / "fresh")]
    with pytest.raises(UserError, match=r"initial_load_path: .*step-1 cannot be read"):
        run([*fresh, "--checkpoint.initial_load_path", str(ckpt / "step-1")])


def test_a_step_folder_without_metadata_is_reported_and_kept(two_steps, tmp_path, caplog):
    dump = copy_of(two_steps, tmp_path)
    old = dump / "checkpoint" / "step-2"
    (old / ".metadata").unlink()
    shard = hashlib.sha256((old / "__0_0.distcp").read_bytes()).hexdigest()
    with caplog.at_level("WARNING", logger="titan"):
        run([*TINY, *CKPT, "--training.steps", "2", "--job.dump_folder", str(dump)])
    assert any(f"{old} lacks .metadata" in r.getMessage() for r in caplog.records)
    (aside,) = old.parent.glob("step-2.replaced-*")  # not deleted by the new save of step 2
    assert hashlib.sha256((aside / "__0_0.distcp").read_bytes()).hexdigest() == shard
    assert (old / ".metadata").is_file()  # the new step-2 is complete


def test_a_checkpoint_of_another_model_is_refused_before_the_dump_folder_changes(
    two_steps, tmp_path
):
    from titan_llama3 import LLAMA3_FLAVORS, train_spec

    debug = LLAMA3_FLAVORS["debugmodel"]
    wide = dataclasses.replace(debug, dim=128, n_heads=8, n_kv_heads=4)
    register_train_spec(dataclasses.replace(train_spec, name="llama3-wide", flavors={"w": wide}))
    dump = copy_of(two_steps, tmp_path)
    before = tree_hash(dump)
    args = [*TINY, *CKPT, "--model.name", "llama3-wide", "--model.flavor", "w"]
    with pytest.raises(UserError, match="holds llama3 debugmodel, which does not match") as e:
        run([*args, "--training.steps", "3", "--job.dump_folder", str(dump)])
    assert "\n" not in str(e.value)
    assert tree_hash(dump) == before  # no previous-runs/, config.toml as it was

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(UserError, match="does not match llama3-wide w"):
        run(
            [
                *args,
                "--job.dump_folder",
                str(fresh),
                "--checkpoint.initial_load_path",
                str(dump / "checkpoint"),
            ]
        )
    assert not any(fresh.iterdir())

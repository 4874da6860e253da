"""[validation]: the loss on held-out data, its batches, its logging and its refusals.

Layout parity (FSDP, HSDP, TP, PP, CP against one process) is checked by the parity matrix
(test_parallel_parity.py, test_fsdp.py), whose runs all validate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import FAST, read_metrics, run_cli, validation_flags, write_validation_set
from titan_core.config.manager import build_config
from titan_core.data import load_tokenizer
from titan_core.data.sources import open_documents
from titan_core.trainer import Trainer
from titan_core.validate import IGNORE_INDEX, ValidationBatches


@pytest.fixture(scope="module")
def valid_path(tmp_path_factory):
    return write_validation_set(tmp_path_factory.mktemp("valid"))


def reference_windows(path, seq_len: int) -> list[list[int]]:
    """The set's windows, cut here from the documents in the order the source serves them."""
    tok = load_tokenizer("")
    source = open_documents("", str(path), seed=0)
    stream: list[int] = []
    for i in range(source.pass_length):
        stream += [tok.bos_id, *tok.encode(source.get(i)), tok.eos_id]
    n = len(stream) // (seq_len + 1)
    return [stream[k * (seq_len + 1) : (k + 1) * (seq_len + 1)] for k in range(n)]


@pytest.mark.parametrize("local_batch_size, dp", [(1, 1), (3, 1), (2, 4), (8, 2)])
def test_the_whole_set_is_every_window_once_for_any_batching(valid_path, local_batch_size, dp):
    want = reference_windows(valid_path, 64)
    rows: list[list[int]] = []
    for rank in range(dp):
        batches = ValidationBatches(
            lambda: open_documents("", str(valid_path), seed=0),
            load_tokenizer(""),
            seq_len=64,
            local_batch_size=local_batch_size,
            dp_rank=rank,
            dp_degree=dp,
        )
        for b, (inputs, labels) in enumerate(batches.batches(-1)):
            assert inputs.shape == labels.shape == (local_batch_size, 64)
            for j in range(local_batch_size):
                if (labels[j] == IGNORE_INDEX).all():  # padding of the last batch only
                    continue
                rows.append((b, rank, j, [*inputs[j].tolist(), labels[j, -1].item()]))
    rows.sort()
    assert len(want) > 40 and [r[-1] for r in rows] == want


def test_steps_bounds_the_batches(valid_path):
    batches = ValidationBatches(
        lambda: open_documents("", str(valid_path), seed=0),
        load_tokenizer(""),
        seq_len=64,
        local_batch_size=4,
        dp_rank=0,
        dp_degree=1,
    )
    assert len(list(batches.batches(3))) == 3
    assert len(list(batches.batches(-1))) == math.ceil(len(reference_windows(valid_path, 64)) / 4)


def test_validation_loss_is_the_mean_token_loss_of_the_set(valid_path, tmp_path):
    """Against a direct computation: the model on every window, one cross entropy over all
    tokens. Validation leaves the model in train mode, without gradients and unchanged."""
    argv = [*FAST, *validation_flags(valid_path, local_batch_size=5)]
    trainer = Trainer(build_config([*argv, "--job.dump_folder", str(tmp_path)]))
    (model,) = trainer.model_parts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = trainer.validator.run(trainer)
    windows = torch.tensor(reference_windows(valid_path, 64))
    with torch.no_grad():
        logits = model(windows[:, :-1])
    want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert got["validation_loss"] == pytest.approx(want, rel=1e-6)
    assert got["validation_perplexity"] == pytest.approx(math.exp(want), rel=1e-6)
    assert got["validation_tokens"] == windows[:, 1:].numel()
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    trainer.metrics.close()


def test_a_run_logs_validation_to_the_console_jsonl_and_tensorboard(valid_path, tmp_path):
    argv = [
        *FAST, "--training.steps", "3", "--metrics.enable_tensorboard",
        *validation_flags(valid_path, local_batch_size=4, freq=2), "--validation.steps", "2",
        "--job.dump_folder", str(tmp_path),
    ]  # fmt: skip
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {m["step"]: m for m in read_metrics(tmp_path)}
    assert [s for s, m in records.items() if "validation_loss" in m] == [2, 3]  # freq, last
    for s in (2, 3):
        m = records[s]
        assert m["validation_tokens"] == 2 * 4 * 64  # 2 batches of 4 rows
        assert m["validation_perplexity"] == pytest.approx(math.exp(m["validation_loss"]))
    lines = [line for line in proc.stderr.splitlines() if "val_loss" in line]
    assert len(lines) == 2 and "step 2/3" in lines[0] and "val_ppl" in lines[0]
    assert "eta ?" in proc.stderr and "eta 0s" in lines[1]  # unknown after one step, then none
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb").glob("**/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("validation_loss")]
    assert tb == [(s, pytest.approx(records[s]["validation_loss"], rel=1e-6)) for s in (2, 3)]


@pytest.mark.parametrize(
    "extra, world, needles",
    [
        (["--validation.seq_len", "128"], 1, ["validation.seq_len=128", "training.seq_len=64"]),
        (["--validation.steps", "0"], 1, ["validation.steps=0", "-1"]),
        (
            ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4",
             "--validation.local_batch_size", "2"],
            2,
            ["validation.local_batch_size=2", "training's (4 and 64)"],
        ),
        (["--validation.dataset_path", "/nonexistent/v.jsonl"], 1, ["validation.dataset_path"]),
    ],
    ids=["longer-than-training", "zero-steps", "pp-shape", "missing-path"],
)  # fmt: skip
def test_bad_validation_settings_are_refused_in_one_line(
    valid_path, tmp_path, monkeypatch, capsys, extra, world, needles
):
    import titan_core.distributed
    import titan_core.trainer
    from titan_core.train import main

    monkeypatch.setattr(titan_core.trainer, "init_process_group", _no_process_group)
    monkeypatch.setattr(titan_core.distributed, "exit_now", lambda code: None)
    for var, value in (("WORLD_SIZE", world), ("RANK", 0), ("LOCAL_RANK", 0)):
        monkeypatch.setenv(var, str(value))
    dump = tmp_path / "run"
    argv = [*FAST, *validation_flags(valid_path, local_batch_size=4), *extra]
    assert main([*argv, "--job.dump_folder", str(dump)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not dump.exists()


def test_an_unreachable_validation_dataset_names_the_validation_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [*FAST, "--validation.enable", "--validation.seq_len", "64"]
    argv += ["--job.dump_folder", str(tmp_path / "run")]
    proc = run_cli(argv)  # validation.dataset defaults to c4_validation, as in torchtitan
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.count("validation.dataset") >= 2 and "training.dataset" not in line, line
    assert not (tmp_path / "run").exists()


def _no_process_group(*args, **kwargs):
    raise AssertionError("a process group was started before the refusal")

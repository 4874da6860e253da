"""Every optional TrainSpec hook a plugin can set is really used by the trainer: each test
registers llama3 with one hook overridden and checks its effect on the run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import read_metrics
from titan_core.errors import UserError
from titan_core.train import run
from titan_core.train_spec import register_train_spec
from titan_core.trainer import cross_entropy_loss
from titan_llama3 import train_spec as llama3

TINY = ["--training.steps", "2", "--training.seq_len", "32", "--training.local_batch_size", "2"]
TINY += ["--metrics.log_freq", "1", "--metrics.no_enable_tensorboard", "--training.deterministic"]


def train(tmp_path, name: str, **hooks) -> list[dict]:
    """Train 2 steps of llama3 debugmodel registered as ``name`` with ``hooks`` set."""
    register_train_spec(dataclasses.replace(llama3, name=name, **hooks))
    dump = tmp_path / name
    run([*TINY, "--model.name", name, "--job.dump_folder", str(dump)])
    return read_metrics(dump)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return train(tmp_path_factory.mktemp("plain"), "plain-llama")


def test_build_loss_fn_is_the_loss_trained_and_logged(tmp_path, plain):
    def build(config):
        return lambda logits, labels: 2.0 * cross_entropy_loss(logits, labels)

    doubled = train(tmp_path, "double-loss", build_loss_fn=build)
    assert doubled[0]["loss"] == pytest.approx(2 * plain[0]["loss"], rel=1e-6)
    assert doubled[0]["grad_norm"] == pytest.approx(2 * plain[0]["grad_norm"], rel=1e-5)


def test_build_optimizer_fn_builds_the_optimizer_that_steps(tmp_path, plain):
    made = []

    class CountingSGD(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            CountingSGD.steps += 1
            return super().step(closure)

    def build(parts, cfg):
        made.append(cfg.lr)
        return CountingSGD([p for part in parts for p in part.parameters()], lr=cfg.lr)

    metrics = train(tmp_path, "sgd-llama", build_optimizer_fn=build)
    assert made == [pytest.approx(8e-4)] and CountingSGD.steps == 2
    assert metrics[1]["loss"] != plain[1]["loss"]  # SGD, not AdamW, took the first step


def test_build_tokenizer_fn_provides_the_tokenizer(tmp_path):
    from titan_core.data import load_tokenizer

    asked = []

    def build(path):
        asked.append(path)
        return load_tokenizer(path)

    train(tmp_path, "tok-llama", build_tokenizer_fn=build)
    assert asked == [""]

    def refuse(path):
        raise UserError("model.hf_assets_path: this plugin needs its own tokenizer")

    with pytest.raises(UserError, match="needs its own tokenizer"):
        train(tmp_path, "no-tok-llama", build_tokenizer_fn=refuse)


def test_aux_loss_fn_reaches_the_gradients_not_the_logged_loss(tmp_path, plain):
    def aux(model, mesh):
        assert mesh is None
        return 100.0 * model.norm.weight.sum()  # a large, easily seen gradient on the norm

    metrics = train(tmp_path, "aux-llama", aux_loss_fn=aux)
    assert metrics[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)
    assert metrics[0]["grad_norm"] > 10 * plain[0]["grad_norm"]


def test_post_optimizer_fn_runs_after_every_step_and_its_numbers_are_logged(tmp_path):
    calls = []

    def hook(parts, mesh):
        assert mesh is None and len(parts) == 1
        calls.append(1)
        return {"hook_calls": float(len(calls))}

    metrics = train(tmp_path, "hooked-llama", post_optimizer_fn=hook)
    assert [m["hook_calls"] for m in metrics] == [1.0, 2.0]

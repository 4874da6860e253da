"""Pipeline parallelism: the split, the schedule rules, and a pipelined step against one process.

Unit tests run in this process. The distributed tests launch tests/dist_scripts/pp_check.py
under torchrun with 2 gloo ranks, once for every schedule of this torch (one launch runs them
all, since starting torchrun costs more than a schedule), and compare loss, gradients by name
and the global gradient norm with the whole model on the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import REPO
from titan_core.errors import UserError
from titan_core.parallel import pipeline
from titan_core.parallel.grad_norm import clip_grad_norm_
from titan_core.parallel.pipeline import (
    SCHEDULES,
    check_microbatches,
    layer_split,
    microbatch_count,
    schedule_class,
    split_model,
    stage_ids,
    stages_per_rank,
)
from titan_llama3 import LLAMA3_FLAVORS, Transformer

TINY = dataclasses.replace(LLAMA3_FLAVORS["debugmodel"], n_layers=4, max_seq_len=16)


def tiny_model(**changes) -> Transformer:
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(TINY, **changes))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


# ---- the split ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_layers, n_stages, sizes",
    [
        (4, 2, [2, 2]),
        (6, 4, [1, 2, 2, 1]),  # embedding and norm+output weigh a block each
        (16, 4, [3, 5, 5, 3]),
        (4, 4, [1, 1, 1, 1]),  # every stage keeps one block even when the ends are heavier
        (5, 2, [3, 2]),
        (3, 1, [3]),
    ],
)
def test_layer_split_balances_counting_the_ends(n_layers, n_stages, sizes):
    split = layer_split(n_layers, n_stages, None)
    assert [len(s) for s in split] == sizes
    assert [i for s in split for i in s] == list(range(n_layers))  # contiguous, in order


def test_layer_split_with_layers_per_stage():
    assert layer_split(8, 4, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layer_split(6, 2, 3, stages_per_rank=2) == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("per_stage, n_stages", [(3, 4), (2, 2), (0, 4)])
def test_layer_split_refuses_a_layers_per_stage_that_misses(per_stage, n_stages):
    with pytest.raises(UserError) as e:
        layer_split(8, n_stages, per_stage, stages_per_rank=2)
    msg = str(e.value)
    assert msg.startswith("parallelism.pipeline_parallel_layers_per_stage=")
    assert "pipeline_parallel_degree" in msg and "stages per rank" in msg and "8" in msg


def test_layer_split_refuses_more_stages_than_blocks():
    with pytest.raises(UserError, match=r"parallelism\.pipeline_parallel_degree: 4 pipeline"):
        layer_split(3, 4, None)


def test_split_model_keeps_names_and_drops_the_rest():
    model = tiny_model()
    first = split_model(model, [0, 1], is_first=True, is_last=False)
    last = split_model(model, [3], is_first=False, is_last=True)
    assert list(first.layers) == ["0", "1"] and list(last.layers) == ["3"]
    assert first.norm is None and first.output is None and first.tok_embeddings is not None
    assert last.tok_embeddings is None and last.norm is not None and last.output is not None
    assert first.rope is not None and last.rope is not None
    names = dict(last.named_parameters())
    assert "layers.3.attention.wq.weight" in names
    assert not any(n.startswith(("tok_embeddings", "layers.0")) for n in names)
    # Copies: changing a stage leaves the model (and so every other stage) alone.
    torch.testing.assert_close(names["output.weight"], model.output.weight, rtol=0, atol=0)
    with torch.no_grad():
        names["layers.3.attention.wq.weight"].add_(1.0)
    assert not torch.equal(
        names["layers.3.attention.wq.weight"], model.layers["3"].attention.wq.weight
    )


def test_split_model_works_on_meta():
    with torch.device("meta"):
        model = Transformer(TINY)
    part = split_model(model, [2], is_first=False, is_last=False)
    assert list(part.layers) == ["2"]
    assert all(p.is_meta for p in part.parameters())


def test_stages_run_in_sequence_equal_the_whole_model():
    """Four stages fed forward by hand give the whole model's logits (B, S, vocab)."""
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    splits = layer_split(TINY.n_layers, 4, None)
    h = tokens
    for i, layers in enumerate(splits):
        h = split_model(model, layers, is_first=i == 0, is_last=i == len(splits) - 1)(h)
    assert h.shape == (2, 16, TINY.vocab_size)
    torch.testing.assert_close(h, model(tokens), rtol=0, atol=0)


# ---- schedules -----------------------------------------------------------------------------


def test_schedules_of_this_torch():
    assert {"GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble"} <= set(SCHEDULES)
    for name in SCHEDULES:
        assert schedule_class(name).__name__.lower().endswith(name.lower())
    assert schedule_class("interleaved1f1b") is schedule_class("Interleaved1F1B")


def test_model_packages_load_the_pipeline_machinery_only_when_it_runs():
    """torch.distributed.pipelining imports torch._dynamo (0.5 s): commands that never build a
    pipeline (titan-convert, titan-train --help, a 1-process run) must not pay for it."""
    code = (
        "import sys, titan_llama3, titan_qwen3, titan_core.train\n"
        "loaded = [m for m in ('torch.distributed.pipelining', 'torch._dynamo') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_schedule_class_refuses_an_unknown_name_listing_the_known():
    with pytest.raises(UserError) as e:
        schedule_class("Zigzag")
    msg = str(e.value)
    assert msg.startswith("parallelism.pipeline_parallel_schedule: 'Zigzag'")
    assert all(name in msg for name in SCHEDULES)


def test_stage_ids_loop_and_v():
    assert [stages_per_rank(n) for n in ("GPipe", "1F1B", "Interleaved1F1B", "DualPipeV")] == [
        1,
        1,
        2,
        2,
    ]
    assert stage_ids("1F1B", 4, 1) == [1]
    assert stage_ids("Interleaved1F1B", 4, 1) == [1, 5]
    assert stage_ids("LoopedBFS", 2, 0) == [0, 2]
    assert stage_ids("ZBVZeroBubble", 4, 1) == [1, 6]
    assert stage_ids("DualPipeV", 2, 0) == [0, 3]
    for name in SCHEDULES:
        held = [s for r in range(4) for s in stage_ids(name, 4, r)]
        assert sorted(held) == list(range(4 * stages_per_rank(name))), name


# The rules found by running every schedule on 2 and 4 ranks with 1..12 microbatches.
RUNS = {
    "GPipe": lambda pp, n: True,
    "LoopedBFS": lambda pp, n: True,
    "ZBVZeroBubble": lambda pp, n: True,
    "1F1B": lambda pp, n: n >= pp,
    "DualPipeV": lambda pp, n: n >= 2 * pp,
    "Interleaved1F1B": lambda pp, n: n % max(1, n // pp) == 0,
    "InterleavedZeroBubble": lambda pp, n: n % max(1, n // pp) == 0,
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_microbatch_rules(name):
    for pp in (2, 4):
        for n in range(1, 13):
            if RUNS[name](pp, n):
                check_microbatches(name, pp, n)
            else:
                with pytest.raises(UserError, match=r"training\.local_batch_size / parallelism"):
                    check_microbatches(name, pp, n)


def test_microbatch_count_names_the_batch_keys():
    assert microbatch_count("1F1B", 2, 8, 2) == 4
    with pytest.raises(UserError, match="pipeline_parallel_microbatch_size=3: must be >= 1"):
        microbatch_count("1F1B", 2, 8, 3)
    with pytest.raises(UserError, match=r"gives 2 microbatches, but DualPipeV on 2 .* at least 4"):
        microbatch_count("DualPipeV", 2, 4, 2)


class _OneRankMesh:
    """Enough of a DeviceMesh for build_pipeline to reach its checks."""

    def size(self) -> int:
        return 2

    def get_local_rank(self) -> int:
        return 0

    def get_group(self):
        raise AssertionError("the checks should refuse before any stage is built")


def test_build_pipeline_refuses_tied_embeddings_and_few_microbatches():
    kwargs = dict(layers_per_stage=None, loss_fn=F.cross_entropy, device=torch.device("cpu"))
    with torch.device("meta"):
        tied = Transformer(dataclasses.replace(TINY, tie_word_embeddings=True))
        untied = Transformer(TINY)
    with pytest.raises(UserError, match="tie_word_embeddings"):
        pipeline.build_pipeline(
            tied, pp_mesh=_OneRankMesh(), schedule_name="1F1B", n_microbatches=4, **kwargs
        )
    with pytest.raises(UserError, match="gives 1 microbatches"):
        pipeline.build_pipeline(
            untied, pp_mesh=_OneRankMesh(), schedule_name="1F1B", n_microbatches=1, **kwargs
        )


# ---- gradient clipping in one process ------------------------------------------------------


def test_clip_grad_norm_over_parts_equals_the_norm_of_the_whole():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    parts = [split_model(model, [0, 1], True, False), split_model(model, [2, 3], False, True)]
    model(tokens).square().mean().backward()
    parts[1](parts[0](tokens)).square().mean().backward()
    norm = clip_grad_norm_(parts, math.inf, None)
    # The exact norm (float64), which torch's float32 clip_grad_norm_ only approximates.
    exact = torch.stack([p.grad.double().square().sum() for p in model.parameters()]).sum().sqrt()
    assert norm.item() == pytest.approx(exact.item(), rel=1e-7)
    torch_fp32 = nn.utils.clip_grad_norm_(model.parameters(), math.inf)
    torch.testing.assert_close(norm, torch_fp32, rtol=1e-5, atol=0)
    before = parts[1].output.weight.grad.clone()
    assert clip_grad_norm_(parts, norm.item() / 4, None) == pytest.approx(norm.item(), rel=1e-6)
    torch.testing.assert_close(parts[1].output.weight.grad, before / 4, rtol=1e-5, atol=0)
    assert clip_grad_norm_(parts, math.inf, None).item() == pytest.approx(norm.item() / 4, rel=1e-5)


# ---- distributed -------------------------------------------------------------------------


def launch(*extra: str) -> subprocess.CompletedProcess:
    """pp_check.py with every schedule of this torch, under torchrun with 2 gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(REPO / "tests" / "dist_scripts" / "pp_check.py"), "--schedule", *SCHEDULES, *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def plain_run():
    return launch()


@pytest.fixture(scope="module")
def fsdp_run():
    return launch("--fsdp")


def assert_schedule_ok(proc: subprocess.CompletedProcess, name: str) -> None:
    # NOTE: searched, not split into lines: two ranks write to one pipe, so a verdict can follow
    # another's on the same line; the ";" ends each schedule name.
    verdicts = re.findall(r"(OK|FAIL) rank (\d) ([A-Za-z0-9]+);", proc.stdout)
    failures = [v for v in verdicts if v[0] == "FAIL" and v[2] == name]
    assert not failures, proc.stdout[-4000:]
    for rank in ("0", "1"):
        assert ("OK", rank, name) in verdicts, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCHEDULES)
def test_pipelined_step_equals_one_process(plain_run, name):
    assert_schedule_ok(plain_run, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", SCHEDULES)
def test_pipelined_step_with_fsdp_stages_equals_one_process(fsdp_run, name):
    """Each stage under FSDP2: gradients are DTensors, the norm is combined across meshes."""
    assert_schedule_ok(fsdp_run, name)

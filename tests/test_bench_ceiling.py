"""The CPU training benchmark's kernel split, which its printed ceiling is computed from."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_matmul_only_step_is_all_library_kernel_time(bench_train):
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    split = bench_train.kernel_split(lambda: a @ b, steps=4)
    assert split["matmul"] > 0.8 and split["attention"] == 0.0
    assert sum(split.values()) == pytest.approx(1.0)


def test_attention_and_elementwise_work_land_in_their_own_shares(bench_train):
    q = torch.randn(4, 8, 256, 16)
    attention = bench_train.kernel_split(
        lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True), steps=4
    )
    assert attention["attention"] > 0.5 and attention["matmul"] == 0.0

    x = torch.randn(512, 512)
    elementwise = bench_train.kernel_split(lambda: torch.sin(x).mul_(2.0), steps=4)
    assert elementwise["other"] > 0.8
    assert elementwise["matmul"] == elementwise["attention"] == 0.0


def test_the_replay_makes_only_the_library_calls_it_recorded(bench_train):
    a = torch.randn(64, 32)
    b = torch.randn(32, 16)
    q = torch.randn(1, 4, 32, 8, requires_grad=True)
    kv = torch.randn(1, 2, 32, 8, requires_grad=True)

    def step():
        torch.sin(a)
        torch.mm(a, b)
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)

    replay = bench_train.replay_library_calls(step)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        replay()
    names = [event.name for event in prof.events()]
    assert "aten::sin" not in names
    assert [e.input_shapes[:2] for e in prof.events() if e.name == "aten::mm"] == [
        [[64, 32], [32, 16]]
    ]
    assert names.count(bench_train.KERNELS["attention"][0]) == 1
    assert names.count(bench_train.KERNELS["attention"][1]) == 1

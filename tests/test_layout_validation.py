"""Refusals of impossible layouts (one line naming keys and numbers), and AC wrapping."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from titan_core.config import build_config
from titan_core.config.job_config import ActivationCheckpoint
from titan_core.errors import UserError
from titan_core.parallel import ParallelDims, apply_activation_checkpointing, validate_layout
from titan_llama3 import LLAMA3_FLAVORS, Transformer

DEBUG = LLAMA3_FLAVORS["debugmodel"]  # 16 heads, 8 kv heads, 6 layers


def check(argv: list[str], world_size: int, args=DEBUG) -> None:
    config = build_config(argv)
    dims = ParallelDims.from_config(config.parallelism, world_size)
    validate_layout(dims, config, args)


@pytest.mark.parametrize(
    "argv, world, needle",
    [
        (["--parallelism.tensor_parallel_degree", "3"], 3, "does not divide the model's n_heads=16"),
        (
            ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"],
            8,
            "the world size is 8",
        ),
        (
            ["--parallelism.context_parallel_degree", "2", "--training.seq_len", "102"],
            2,
            "training.seq_len=102 must be divisible by 2 x context_parallel_degree",
        ),
        (
            [
                "--parallelism.pipeline_parallel_degree", "2",
                "--parallelism.pipeline_parallel_microbatch_size", "3",
            ],
            2,
            "pipeline_parallel_microbatch_size=3 does not divide training.local_batch_size=8",
        ),
        (
            ["--parallelism.tensor_parallel_degree", "2", "--parallelism.enable_async_tensor_parallel"],
            2,
            "needs tensor_parallel_degree > 1 and --compile.enable",
        ),
    ],
)  # fmt: skip
def test_impossible_layouts_are_refused(argv, world, needle):
    with pytest.raises(UserError) as e:
        check(argv, world)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_kv_heads_are_checked_too():
    args = dataclasses.replace(DEBUG, n_heads=16, n_kv_heads=2)
    with pytest.raises(UserError, match="n_kv_heads=2"):
        check(["--parallelism.tensor_parallel_degree", "4"], 4, args)


def test_valid_layouts_pass():
    check(["--parallelism.tensor_parallel_degree", "2"], 4)
    check(["--parallelism.context_parallel_degree", "2", "--training.seq_len", "64"], 4)


@pytest.mark.parametrize("option", ["0", "x", "-1"])
def test_bad_selective_ac_option(option):
    from titan_core.preflight import validate_training

    config = build_config(
        [
            "--activation_checkpoint.mode",
            "selective",
            "--activation_checkpoint.selective_ac_option",
            option,
        ]
    )
    dims = ParallelDims.from_config(config.parallelism, 1)
    with pytest.raises(UserError, match="selective_ac_option"):
        validate_training(config, dims)


def tiny_model() -> Transformer:
    args = dataclasses.replace(DEBUG, n_layers=4, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    return model


@pytest.mark.parametrize(
    "mode, option, wrapped",
    [
        ("none", "2", []),
        ("full", "2", [0, 1, 2, 3]),
        ("selective", "2", [1, 3]),
        ("selective", "op", [0, 1, 2, 3]),
    ],
)
def test_activation_checkpointing_wraps_blocks_and_keeps_gradients(mode, option, wrapped):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    reference, model = tiny_model(), tiny_model()
    apply_activation_checkpointing(
        model, ActivationCheckpoint(mode=mode, selective_ac_option=option)
    )
    got = [
        i for i, block in enumerate(model.layers.values()) if isinstance(block, CheckpointWrapper)
    ]
    assert got == wrapped
    # Checkpoint names are unchanged, and so are the gradients.
    assert model.state_dict().keys() == reference.state_dict().keys()
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 16))
    for m in (reference, model):
        m(tokens).float().square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)

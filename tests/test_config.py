"""Config parsing: precedence, types, booleans, lists, round trip and every refusal."""

from __future__ import annotations

import pytest

from titan_core.config import JobConfig, build_config, help_text, load_toml, to_toml
from titan_core.config.job_config import LRScheduler
from titan_core.errors import UserError
from titan_core.optim import lr_factor


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_embedded_debug_run():
    c = build_config([])
    assert (c.model.name, c.model.flavor, c.training.dataset) == (
        "llama3",
        "debugmodel",
        "embedded",
    )
    assert c.model.hf_assets_path == ""


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 0.01\n")
    c = build_config(["--job.config_file", path, "--training.steps", "3"])
    assert c.training.steps == 3  # CLI wins
    assert c.training.seq_len == 64  # TOML wins over the default
    assert c.optimizer.lr == 0.01
    assert c.training.local_batch_size == JobConfig().training.local_batch_size


def test_config_file_position_does_not_matter(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\n")
    c = build_config(["--training.steps=2", f"--job.config_file={path}"])
    assert c.training.steps == 2


def test_boolean_flags():
    assert build_config(["--training.deterministic"]).training.deterministic is True
    c = build_config(["--metrics.enable_tensorboard", "false", "--training.deterministic", "true"])
    assert c.metrics.enable_tensorboard is False and c.training.deterministic is True
    assert build_config(["--metrics.no_enable_tensorboard"]).metrics.enable_tensorboard is False
    c = build_config(["--training.deterministic", "--training.steps", "4"])
    assert c.training.deterministic is True and c.training.steps == 4


def test_lists_and_optionals():
    c = build_config(["--compile.components", "model", "--lr_scheduler.decay_ratio", "0.5"])
    assert c.compile.components == ["model"]
    assert c.lr_scheduler.decay_ratio == 0.5
    assert build_config(["--compile.components", "model,loss"]).compile.components == [
        "model",
        "loss",
    ]


def test_round_trip_through_toml(tmp_path):
    c = build_config(
        [
            "--training.steps",
            "9",
            "--compile.components",
            "loss",
            "--job.description",
            'a "quoted"\nline',
        ]
    )
    path = write(tmp_path, to_toml(c))
    again = JobConfig()
    load_toml(again, path)
    assert again == c


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--training.stpes", "3"], "training.stpes"),
        (["--training.stpes", "3"], "did you mean 'steps'"),
        (["--trainin.steps", "3"], "unknown section 'trainin'"),
        (["--training.steps", "three"], "--training.steps: expected integer"),
        (["--optimizer.lr", "fast"], "--optimizer.lr: expected number"),
        (["--training.deterministic", "maybe"], "argument 'maybe'"),
        (["--lr_scheduler.decay_type", "exp"], "one of linear|cosine|sqrt"),
        (["--training.steps"], "missing a value"),
        (["steps=3"], "expected --section.key VALUE"),
        (["--job.config_file", "/nonexistent/x.toml"], "job.config_file: /nonexistent/x.toml"),
    ],
)
def test_cli_errors_name_the_key(argv, needle):
    with pytest.raises(UserError) as e:
        build_config(argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[training]\nsteps = '10'\n", "[training] steps: expected integer, got '10'"),
        ("[training]\nstep = 10\n", "unknown key 'training.step'"),
        ("[nope]\nx = 1\n", "unknown section 'nope'"),
        ("[training\nsteps = 1\n", "is not valid TOML"),
        ("steps = 1\n", "must be a [section] table"),
        ("[training]\ndeterministic = 1\n", "deterministic: expected boolean"),
    ],
)
def test_toml_errors_name_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        build_config(["--job.config_file", path])
    assert needle in str(e.value)


def test_help_lists_every_key():
    text = help_text()
    for key in (
        "--training.seq_len",
        "--parallelism.data_parallel_shard_degree",
        "--metrics.log_freq",
    ):
        assert key in text
    assert "default 100" in text  # training.steps


def test_lr_schedule_values():
    cfg = LRScheduler(warmup_steps=4, decay_ratio=None, decay_type="linear", min_lr_factor=0.0)
    got = [lr_factor(s, cfg, 12) for s in range(1, 13)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    assert got[4:] == pytest.approx([1 - k / 8 for k in range(1, 9)])
    cfg = LRScheduler(warmup_steps=2, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.1)
    got = [lr_factor(s, cfg, 10) for s in range(1, 11)]
    assert got[2:6] == [1.0] * 4  # stable until the last half of the 8 post-warmup steps
    assert got[7] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert got[-1] == pytest.approx(0.1)
    cfg = LRScheduler(warmup_steps=0, decay_ratio=None, decay_type="sqrt", min_lr_factor=0.0)
    assert lr_factor(4, cfg, 16) == pytest.approx(0.5)


def test_scheduler_drives_the_optimizer_lr():
    import torch

    from titan_core.optim import build_lr_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = build_lr_scheduler(opt, LRScheduler(warmup_steps=2), 4)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [1.0, 2.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "hyphenated, underscored",
    [
        (["--training.local-batch-size", "4"], ["--training.local_batch_size", "4"]),
        (["--training.local-batch-size=4"], ["--training.local_batch_size=4"]),
        (["--training.steps=3"], ["--training.steps", "3"]),
        (["--compile.enable", "--compile.no-enable"], ["--compile.enable", "--compile.no_enable"]),
        (
            ["--compile.enable", "--compile.no_enable"],
            ["--compile.enable", "--compile.enable=false"],
        ),
        (
            ["--quantize.linear.float8.enable-fsdp-float8-all-gather"],
            ["--quantize.linear.float8.enable_fsdp_float8_all_gather"],
        ),
        (
            ["--quantize.linear.float8.no-enable-fsdp-float8-all-gather"],
            ["--quantize.linear.float8.enable_fsdp_float8_all_gather", "false"],
        ),
        (["--lr-scheduler.decay-ratio", "0.5"], ["--lr_scheduler.decay_ratio", "0.5"]),
    ],
)
def test_hyphens_in_flags_mean_underscores(hyphenated, underscored):
    assert build_config(hyphenated) == build_config(underscored)


def test_hyphenated_flags_set_the_field():
    assert build_config(["--training.local-batch-size", "3"]).training.local_batch_size == 3
    assert build_config(["--compile.enable"]).compile.enable is True
    for off in ("--compile.no-enable", "--compile.no_enable"):
        assert build_config(["--compile.enable", off]).compile.enable is False
    c = build_config(["--quantize.linear.float8.enable-fsdp-float8-all-gather"])
    assert c.quantize.linear.float8.enable_fsdp_float8_all_gather is True


def test_hyphenated_config_file_flag_reads_the_toml(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 7\nseq_len = 64\n")
    for argv in (["--job.config-file", path], [f"--job.config-file={path}"]):
        c = build_config([*argv, "--training.steps", "3"])
        assert (c.training.steps, c.training.seq_len) == (3, 64)
        assert c == build_config(["--job.config_file", path, "--training.steps", "3"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--training.local-batch-sise", "4"], "--training.local-batch-sise: unknown key"),
        (["--training.local-batch-sise", "4"], "did you mean 'local_batch_size'"),
        (["--training.local-batch-size", "many"], "--training.local-batch-size: expected integer"),
        (["--training.local-batch-size"], "write --training.local-batch-size VALUE"),
        (["--train-ing.steps", "3"], "--train-ing.steps: unknown section 'train_ing'"),
    ],
)
def test_hyphenated_flag_errors_name_the_flag_as_typed(argv, needle):
    with pytest.raises(UserError) as e:
        build_config(argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)

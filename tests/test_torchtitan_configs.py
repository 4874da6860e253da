"""torchtitan's own train configs carry over: TOMLs with the key sets of torchtitan's llama3
(debug, 8B, 70B, 405B), qwen3 (0.6B, 1.7B, 32B, MoE debug) and DeepSeek V3 (debug, 16B, 671B)
configs and of its integration-test base config load in titan as written, round-trip through
``to_toml``, and train 2 steps with tiny overrides (the family's debug flavor, every degree 1,
seq_len 64, the embedded data and tokenizer).

The TOMLs are written here, not copied: same sections, keys and values, in another order.
``Case.source`` names the torchtitan file and commit each one mirrors. Where that version is
newer than v0.2 and names its data in a ``[training.data]`` or ``[validation.data]`` table
(``name = ...``), the TOML keeps v0.2's spelling, ``dataset = ...`` in ``[training]`` or
``[validation]``, as torchtitan's v0.2 files of the same shape do (the integration-test base
config, the autopartition copies of the llama3 configs).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from helpers import losses, run_cli
from titan_core.config import JobConfig, build_config, load_toml, to_toml
from titan_core.config.job_config import section_of
from titan_core.preflight import resolve_model_args
from titan_core.train_spec import get_train_spec
from torchtitan_tomls import CASES, Case

DEGREES = [
    "data_parallel_replicate_degree", "data_parallel_shard_degree", "tensor_parallel_degree",
    "pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree",
    "expert_tensor_parallel_degree",
]  # fmt: skip


def _write(case: Case, folder: Path) -> Path:
    path = folder / case.name.replace("/", "__")
    path.write_text(case.toml)
    return path


def _keys(table: dict, section: str = ""):
    """(section, key, value) for every key of a parsed TOML, nested sections included."""
    for name, value in table.items():
        if isinstance(value, dict):
            yield from _keys(value, f"{section}.{name}" if section else name)
        else:
            yield section, name, value


def tiny_overrides(path: Path, case: Case, dump: Path) -> list[str]:
    """The command line that shrinks a torchtitan config to a 2-step CPU run in one process:
    the debug flavor, the embedded tokenizer and data, every degree 1, and off what would only
    cost time here (compile, float8 without a GPU, profiling)."""
    config = build_config(["--job.config_file", str(path)])
    args = [
        "--job.config_file", str(path), "--job.dump_folder", str(dump),
        "--model.flavor", case.debug_flavor, "--model.hf_assets_path", "",
        "--training.dataset", "embedded", "--training.steps", "2", "--training.seq_len", "64",
        "--training.local_batch_size", "2",
    ]  # fmt: skip
    for key in DEGREES:
        args += [f"--parallelism.{key}", "1"]
    if config.parallelism.enable_async_tensor_parallel:
        args.append("--parallelism.no-enable_async_tensor_parallel")
    if config.compile.enable:
        args.append("--compile.no-enable")
    if config.model.converters:
        args += ["--model.converters", ""]
    if config.profiling.enable_profiling:
        args.append("--profiling.no-enable_profiling")
    if "[validation]" in case.toml:
        args += [
            "--validation.dataset", "embedded", "--validation.seq_len", "64",
            "--validation.local_batch_size", "2", "--validation.steps", "2",
        ]  # fmt: skip
    return args


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_config_loads_as_written_and_round_trips(case, tmp_path):
    path = _write(case, tmp_path)
    config = build_config(["--job.config_file", str(path)])
    written = list(_keys(tomllib.loads(case.toml)))
    assert len(written) >= 35  # a whole torchtitan file, not a fragment
    for section, key, value in written:
        assert getattr(section_of(config, section), key) == value, f"[{section}] {key}"
    resolve_model_args(get_train_spec(config.model.name), config)  # the flavor is known
    again_path = tmp_path / "again.toml"
    again_path.write_text(to_toml(config))
    again = JobConfig()
    load_toml(again, str(again_path))
    assert again == config


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_config_trains_two_steps_with_tiny_overrides(case, tmp_path):
    path = _write(case, tmp_path)
    dump = tmp_path / "run"
    proc = run_cli(tiny_overrides(path, case, dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(dump)
    assert len(curve) == 2 and all(math.isfinite(x) for x in curve), curve

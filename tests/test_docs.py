"""Docs and shipped configs stay true: every key documented, every example config valid."""

from __future__ import annotations

from importlib.resources import files

import pytest

from helpers import REPO
from titan_core.config import JobConfig, load_toml
from titan_core.config.manager import markdown_reference
from titan_core.errors import UserError
from titan_core.preflight import resolve_model_args
from titan_llama3 import LLAMA3_FLAVORS, train_spec

CONFIGS = sorted(
    p for p in files("titan_llama3").joinpath("configs").iterdir() if p.name.endswith(".toml")
)


def test_configuration_doc_is_generated_from_the_dataclasses():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert markdown_reference() in doc


def test_an_example_config_ships_for_every_flavor():
    flavors = set()
    for path in CONFIGS:
        config = JobConfig()
        load_toml(config, str(path))
        assert config.model.name == "llama3"
        resolve_model_args(train_spec, config)  # the flavor exists
        flavors.add(config.model.flavor)
    assert flavors == set(LLAMA3_FLAVORS)


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if "debugmodel" not in p.name], ids=lambda p: p.name
)
def test_real_flavor_configs_name_their_missing_tokenizer(path, tmp_path, monkeypatch):
    from titan_core.train import run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"model\.hf_assets_path"):
        run(["--job.config_file", str(path)])
    assert not (tmp_path / "outputs").exists()

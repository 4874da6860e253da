"""The dataset names torchtitan configs use: ``c4_test`` offline, ``c4``/``c4_validation`` on the hub.

No test reaches the network: the hub is either switched off (``HF_HUB_OFFLINE=1``) or
``datasets.load_dataset`` is replaced, so the arguments titan passes it can be checked.
"""

from __future__ import annotations

import pytest

from helpers import FAST, run_cli
from titan_core.data import open_documents
from titan_core.data import sources as sources_module
from titan_core.errors import UserError


@pytest.fixture
def online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_c4_test_is_the_embedded_corpus_and_needs_no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c4_test = open_documents("c4_test", "", seed=5)
    embedded = open_documents("embedded", "", seed=5)
    assert [c4_test.get(i) for i in range(20)] == [embedded.get(i) for i in range(20)]


@pytest.mark.parametrize(
    "name, split", [("c4", "train"), ("c4_validation", "validation"), ("fineweb", "train")]
)
@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_names_offline_are_refused_in_one_line(monkeypatch, online, name, split, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(UserError) as e:
        open_documents(name, "", seed=0)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"training.dataset: {name} streams hub dataset ")
    assert f"({split} split), but {var} is set" in message
    assert "--training.dataset_path" in message and "--training.dataset embedded" in message


@pytest.mark.parametrize(
    "name, expected",
    [
        ("c4", ("allenai/c4", "en", "train")),
        ("c4_validation", ("allenai/c4", "en", "validation")),
        ("someone/corpus", ("someone/corpus", None, "train")),
    ],
)
def test_hub_names_stream_their_repository_and_split(monkeypatch, online, name, expected):
    import datasets

    calls = []

    def fake_load(repo, config, *, split, streaming):
        calls.append((repo, config, split, streaming))
        return [{"text": "one"}, {"text": "two"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = open_documents(name, "", seed=0)
    assert [source.get(i) for i in range(3)] == ["one", "two", "one"]
    assert calls[0] == (*expected, True)


def test_an_unreachable_hub_is_refused_in_one_line(monkeypatch, online):
    import datasets

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(UserError) as e:
        open_documents("c4_validation", "", seed=0)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("training.dataset: c4_validation could not be opened as hub dataset")
    assert "Couldn't reach 'allenai/c4'" in message
    assert "--training.dataset_path" in message and "embedded" in message


def test_titan_train_refuses_an_offline_hub_dataset_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dump = tmp_path / "run"
    args = [*FAST, "--training.steps", "1", "--training.dataset", "c4"]
    proc = run_cli([*args, "--job.dump-folder", str(dump)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("titan-train: error: training.dataset: c4 streams hub dataset")
    assert "--training.dataset_path" in proc.stderr
    assert not dump.exists()


def test_module_docstring_names_every_short_name():
    for name in (*sources_module.HUB_DATASETS, "c4_test", "embedded"):
        assert f"``{name}``" in sources_module.__doc__

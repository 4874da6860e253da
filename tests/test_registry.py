"""The titan.models entry-point registry: lookup, listing, duplicates, broken plugins."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import titan_core.train_spec as registry
from titan_core import TrainSpec, available_models, get_train_spec
from titan_core.errors import UserError


def fake_ep(name: str, dist: str, load):
    return SimpleNamespace(
        name=name, value=f"{dist}_pkg:train_spec", dist=SimpleNamespace(name=dist), load=load
    )


def test_llama3_is_found_through_its_entry_point():
    spec = get_train_spec("llama3")
    assert isinstance(spec, TrainSpec) and spec.name == "llama3"
    assert "debugmodel" in spec.flavors
    assert available_models()["llama3"] == "titan-llama3"


def test_unknown_model_lists_the_installed_ones():
    with pytest.raises(UserError, match=r"no model 'nope' is installed \(installed: .*llama3"):
        get_train_spec("nope")


def test_a_name_registered_twice_names_both_distributions(monkeypatch):
    eps = [fake_ep("dup", "pkg-one", None), fake_ep("dup", "pkg-two", None)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    with pytest.raises(UserError) as e:
        get_train_spec("dup")
    assert "'pkg-one'" in str(e.value) and "'pkg-two'" in str(e.value)


def test_a_broken_plugin_is_named_and_others_keep_working(monkeypatch):
    def broken():
        raise ImportError("No module named 'missing_dep'")

    good = get_train_spec("llama3")
    eps = [
        fake_ep("broken", "titan-broken", broken),
        fake_ep("llama3", "titan-llama3", lambda: good),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    with pytest.raises(UserError) as e:
        get_train_spec("broken")
    assert "titan-broken" in str(e.value) and "missing_dep" in str(e.value)
    assert get_train_spec("llama3") is good


def test_an_entry_point_that_is_not_a_train_spec_is_refused(monkeypatch):
    eps = [fake_ep("odd", "titan-odd", lambda: object())]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    with pytest.raises(UserError, match=r"not a titan_core\.TrainSpec"):
        get_train_spec("odd")


def test_lookup_imports_only_the_requested_plugin(monkeypatch):
    loaded = []
    spec = get_train_spec("llama3")
    eps = [
        fake_ep("a", "pkg-a", lambda: loaded.append("a") or spec),
        fake_ep("b", "pkg-b", lambda: loaded.append("b") or spec),
    ]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps)
    get_train_spec("b")
    assert loaded == ["b"]

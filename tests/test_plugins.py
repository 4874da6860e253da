"""The plugin contract: a package nobody here wrote adds a model by installing itself.

Two throwaway packages are written outside the repo and pip-installed into this environment
(offline, no build isolation): the example of docs/plugins.md, a model built only from
titan-core's shared blocks, and a package whose entry point fails to import. ``titan-train``
then lists both, trains the first, refuses the second in one line naming its distribution, and
every other model keeps working. Both are uninstalled afterwards, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, losses

GOOD_DIST, GOOD_MODEL = "titan-tinydecoder", "tinydecoder"
BROKEN_DIST, BROKEN_MODEL = "titan-test-broken-plugin", "brokenmodel"
DOC = REPO / "docs" / "plugins.md"
BROKEN_MODULE = '''
"""A plugin whose import fails: its dependency is not installed."""

import titan_test_missing_dependency  # noqa: F401
'''


def files_from_the_doc(root: Path) -> Path:
    """The example package of docs/plugins.md: every fenced block whose first line is a comment
    naming a path is written to that path, so the documented plugin is the one tested."""
    blocks = re.findall(r"```(?:toml|python)\n# (\S+)\n(.*?)```", DOC.read_text(), re.S)
    paths = {path for path, _ in blocks}
    assert paths == {"pyproject.toml", "src/titan_tinydecoder/__init__.py"}, paths
    for path, text in blocks:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def write_package(root: Path, dist: str, model: str, source: str) -> Path:
    """A src-layout package ``dist`` whose ``titan.models`` entry point registers ``model``."""
    module = dist.replace("-", "_")
    (root / "src" / module).mkdir(parents=True)
    (root / "src" / module / "__init__.py").write_text(textwrap.dedent(source))
    (root / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.0.1"
        dependencies = ["titan-core"]

        [project.entry-points."titan.models"]
        {model} = "{module}:train_spec"

        [tool.setuptools.packages.find]
        where = ["src"]
        """)
    )
    return root


def pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def titan_train(*args: str) -> subprocess.CompletedProcess:
    """The ``titan-train`` console script, as a user runs it."""
    exe = shutil.which("titan-train")
    assert exe, "titan-train is not on PATH; pip install -e packages/titan-core"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def installed_plugins(tmp_path_factory):
    """Both throwaway packages, built outside the repo and installed; uninstalled after."""
    root = tmp_path_factory.mktemp("plugins")
    assert REPO not in root.parents
    good = files_from_the_doc(root / "good")
    broken = write_package(root / "broken", BROKEN_DIST, BROKEN_MODEL, BROKEN_MODULE)
    try:
        proc = pip("install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                   str(good), str(broken))  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        yield
    finally:
        pip("uninstall", "-y", "-q", GOOD_DIST, BROKEN_DIST)


def test_list_models_shows_each_model_its_flavors_and_distribution(installed_plugins):
    proc = titan_train("--list-models")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert f"from {GOOD_DIST} 0.1.0: debugmodel" in lines[GOOD_MODEL]
    assert "from titan-llama3" in lines["llama3"] and "debugmodel" in lines["llama3"]
    broken = lines[BROKEN_MODEL]
    assert f"from {BROKEN_DIST}" in broken and "BROKEN" in broken
    assert "titan_test_missing_dependency" in broken


def test_a_broken_plugin_is_one_line_naming_its_distribution_exit_2(installed_plugins, tmp_path):
    proc = titan_train("--model.name", BROKEN_MODEL, "--job.dump_folder", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"'{BROKEN_DIST}'" in proc.stderr and "titan_test_missing_dependency" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_the_installed_plugin_trains_next_to_the_broken_one(installed_plugins, tmp_path):
    dump = tmp_path / "run"
    args = ["--model.name", GOOD_MODEL, "--training.steps", "3", "--training.seq_len", "64"]
    args += ["--metrics.log_freq", "1", "--metrics.no_enable_tensorboard"]
    proc = titan_train(*args, "--job.dump_folder", str(dump))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(dump)) == 3
    assert f"model {GOOD_MODEL} debugmodel" in proc.stderr  # the trainer's build log line

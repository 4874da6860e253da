"""Package metadata: every package is BSD-3-Clause with its LICENSE and README beside it, and
titan-core declares only dependencies its source imports."""

from __future__ import annotations

import ast
import email
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

PACKAGES = ["titan-core", "titan-llama3", "titan-qwen3", "titan-deepseek", "titan-convert"]
# Distribution name -> the modules that count as importing it.
MODULES = {
    "torch": ("torch",),
    "tokenizers": ("tokenizers",),
    "datasets": ("datasets",),
    "numpy": ("numpy",),
    "safetensors": ("safetensors",),
    "tensorboard": ("tensorboard", "torch.utils.tensorboard"),
    "torchao": ("torchao",),
}


def project(package: str) -> dict:
    return tomllib.loads((REPO / "packages" / package / "pyproject.toml").read_text())["project"]


def imported_modules(src: Path) -> set[str]:
    """Every module named by an import anywhere in ``src`` (top level or inside functions)."""
    names: set[str] = set()
    for file in src.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_package_declares_its_license_readme_and_urls(package):
    folder = REPO / "packages" / package
    meta = project(package)
    assert meta["license"] == "BSD-3-Clause"
    assert meta["license-files"] == ["LICENSE"]
    license_text = (folder / "LICENSE").read_text()
    assert license_text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the titan authors" in license_text
    assert (folder / meta["readme"]).read_text().startswith(f"# {package}\n")
    assert set(meta["urls"]) == {"Homepage", "Documentation", "Issues"}
    # PEP 639: with a license expression, license classifiers are not allowed.
    assert not any(c.startswith("License ::") for c in meta.get("classifiers", []))
    assert "Programming Language :: Python :: 3.11" in meta["classifiers"]


def test_repository_root_has_the_license():
    assert (REPO / "LICENSE").read_text() == (REPO / "packages/titan-core/LICENSE").read_text()


def test_every_titan_core_dependency_is_imported():
    imported = imported_modules(REPO / "packages/titan-core/src")
    for requirement in project("titan-core")["dependencies"]:
        dist = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        assert dist in MODULES, f"add {dist}'s module names to MODULES"
        assert any(
            name == module or name.startswith(module + ".")
            for name in imported
            for module in MODULES[dist]
        ), f"titan-core declares {dist} but never imports it"


def test_titan_core_wheel_carries_license_metadata(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("PEP 639 metadata needs setuptools >= 77")
    # Build from a copy so the source tree gets no build/ or egg-info folders.
    source = tmp_path / "titan-core"
    shutil.copytree(
        REPO / "packages/titan-core",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*pip, "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = (tmp_path / "dist").glob("titan_core-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = email.message_from_bytes(z.read(metadata))
        [license_file] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert z.read(license_file).decode().startswith("BSD 3-Clause License")
    assert headers["License-Expression"] == "BSD-3-Clause"
    assert headers["License-File"] == "LICENSE"
    assert "Homepage, https://github.com/titan-llm/titan" in headers.get_all("Project-URL")

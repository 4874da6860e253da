"""One entry point for every check: ``nox -s tests``, ``lint``, ``bench``.

Sessions reuse the current interpreter's environment (``python=False``) by default: CI installs
the packages once (see .ci/run) and a 2-core machine has no time to build a venv per session.
Set ``TITAN_NOX_VENV=1`` for an isolated virtualenv per session instead.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests", "dist"]
VENV = os.environ.get("TITAN_NOX_VENV") == "1"
PACKAGES = [
    "-e",
    "packages/titan-core",
    "-e",
    "packages/titan-llama3",
    "-e",
    "packages/titan-qwen3",
    "-e",
    "packages/titan-deepseek",
    "-e",
    "packages/titan-convert",
]


TEST_DEPS = ["pytest", "transformers", "safetensors", "lm-eval[hf]"]


def _install(session: nox.Session) -> None:
    """Install our packages (editable) and the test dependencies into the session's Python."""
    if VENV:
        session.install("torch>=2.11", *TEST_DEPS)
        session.install(*PACKAGES)
    else:
        session.run("python", "-m", "pip", "install", "-q", *TEST_DEPS, *PACKAGES)


@nox.session(python=None if VENV else False)
def tests(session: nox.Session) -> None:
    """Unit and single-process training tests (CPU)."""
    _install(session)
    session.run(
        "python", "-m", "pytest", "-m", "not distributed", "--durations=25",
        *(session.posargs or ["tests"]),
    )  # fmt: skip


@nox.session(python=None if VENV else False)
def dist(session: nox.Session) -> None:
    """Distributed tests: torchrun with 2-4 gloo processes on CPU, incl. the parity matrix."""
    _install(session)
    session.run(
        "python", "-m", "pytest", "-m", "distributed", "--durations=25",
        *(session.posargs or ["tests"]),
    )  # fmt: skip


@nox.session(python=None if VENV else False)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    if VENV:
        session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=None if VENV else False)
def bench(session: nox.Session) -> None:
    """Benchmarks (not tests): ratios against references measured in the same run.

    ``nox -s bench`` runs them all; ``nox -s bench -- NAME`` one of them (train, parallel,
    checkpoint, convert, moe, float8, data, plan, kernels).
    """
    _install(session)
    which = session.posargs or [
        "train", "parallel", "checkpoint", "convert", "moe", "float8", "data", "plan", "kernels",
    ]  # fmt: skip
    for name in which:
        session.run("python", f"bench/bench_{name}.py")


@nox.session(python=None if VENV else False)
def gpu(session: nox.Session) -> None:
    """GPU benchmark on one GPU (not a default session): tests/test_gpu.py, then llama3 1B, 3B
    and 8B (16 of 32 layers) in bf16 eager, bf16 + compile and Float8 + compile; one table, JSON
    under bench/results/. ``nox -s gpu -- --dry-run`` runs the same script on CPU, tiny shapes.

    It installs nothing from a registry (the GPU machine has none): the script installs the
    wheels carried in ``.whl/`` itself (``python bench/bench_gpu.py --print-wheels``).
    """
    if VENV:
        _install(session)
    session.run("python", "bench/bench_gpu.py", *session.posargs)

"""Test-wide setup: ``tests/`` on sys.path for helpers, GPU tests skipped without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _forget_in_process_models():
    """Models a test registers in-process (register_train_spec) do not leak into later tests."""
    from titan_core import train_spec

    before = dict(train_spec._LOCAL)
    yield
    train_spec._LOCAL.clear()
    train_spec._LOCAL.update(before)


@pytest.fixture(scope="session")
def validation_set(tmp_path_factory):
    """A small local validation set shared by the parity runs."""
    from helpers import write_validation_set

    return write_validation_set(tmp_path_factory.mktemp("validation"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, validation_set):
    """Dump folder of the single-process run the parity runs are compared with (FAST settings,
    global batch 8, a whole-set validation after steps 4 and 8)."""
    from helpers import FAST, losses, run_cli, validation_flags

    dump = tmp_path_factory.mktemp("reference")
    args = [*FAST, "--training.global_batch_size", "8", "--training.local_batch_size", "8"]
    args += validation_flags(validation_set, local_batch_size=8)
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = losses(dump)
    assert len(curve) == 8 and curve[0] - curve[-1] > 0.2  # it learns, so a frozen model fails
    return dump


@pytest.fixture(scope="session")
def reference_losses(reference_run):
    """Single-process loss curve of the parity runs."""
    from helpers import losses

    return losses(reference_run)

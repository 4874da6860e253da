"""Ctrl-C during ``titan-convert``: one line, exit code 130, the output folder left as it was."""

from __future__ import annotations

import json
import math
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")


def sparse_llama(folder: Path) -> Path:
    """An HF Llama of ~400 MB whose safetensors file is sparse (all zeros, instant to make),
    so converting it takes long enough to interrupt."""
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
    )  # fmt: skip
    folder.mkdir()
    config.save_pretrained(folder)
    from titan_llama3 import train_spec

    adapter = train_spec.state_dict_adapter
    args = adapter.args_from_hf_config(json.loads((folder / "config.json").read_text()))
    header, offset = {}, 0
    for name, shape in adapter.expected_hf(args).items():
        end = offset + math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # float32 data 8-byte aligned, as safetensors writes it
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return folder


def test_ctrl_c_during_a_conversion_exits_130_and_writes_nothing(tmp_path):
    """A real SIGINT while the DCP files are being written, over an existing OUT_DIR with
    --overwrite: the one line, exit 130, OUT_DIR as it was, no temporary folder left."""
    hf = sparse_llama(tmp_path / "hf")
    out = tmp_path / "dcp"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cmd = [sys.executable, "-m", "titan_convert", "hf-to-dcp", str(hf), str(out), "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temp = tmp_path / f".dcp.partial-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (temp.is_dir() and any(temp.iterdir())) and proc.poll() is None:
        assert time.monotonic() < deadline, "the conversion never started"
        time.sleep(0.005)
    assert proc.poll() is None, "the conversion ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"titan-convert: interrupted; nothing was written to {out}"
    ]
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp", "hf"]  # no temporary folder
    assert [p.name for p in out.iterdir()] == ["precious.txt"]

"""Hostile or damaged Hugging Face folders are refused before any byte of them is used.

Every case is a good tiny Llama folder with one thing broken: a safetensors header, the shard
index or a config.json number. Each entry point (titan-convert hf-to-dcp and verify,
load_pretrained, titan-train's initial_load_in_hf) must refuse it in one line naming the file,
the tensor or key and what is wrong, with nothing written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest

from titan_convert.cli import main as convert_main
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.train import main as train_main

transformers = pytest.importorskip("transformers")

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"  # same shape and dtype as Q_PROJ
SHARD = "model-00001-of-00003.safetensors"


def convert(*argv) -> int:
    return convert_main([str(a) for a in argv])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama saved twice: one ``model.safetensors``, and three shards with an index."""
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    root = tmp_path_factory.mktemp("good")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    assert (root / "sharded" / SHARD).is_file()
    return {"single": root / "single", "sharded": root / "sharded"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_line(err: str, prog: str, *patterns: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def assert_nothing_written(out: Path, before: dict[str, bytes] | None) -> None:
    """``out`` is absent (or, if it existed, byte-for-byte as it was), and no temporary folder
    is left beside it."""
    if before is None:
        assert not out.exists()
    else:
        assert snapshot(out) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def refuse_conversion(folder: Path, tmp_path: Path, capsys, existing: bool, *patterns: str):
    """hf-to-dcp exits 2 with one line matching ``patterns``, and writes nothing: not into a
    new OUT_DIR, nor (with --overwrite) into an existing one."""
    out = tmp_path / "dcp"
    before = None
    if existing:
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        before = snapshot(out)
    capsys.readouterr()
    assert convert("hf-to-dcp", folder, out, "--overwrite") == 2
    assert_one_line(capsys.readouterr().err, "titan-convert", *patterns)
    assert_nothing_written(out, before)


# ---- safetensors headers ---------------------------------------------------------------------


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: dict | bytes, data: bytes, length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def set_offsets(header, name, begin, end):
    header[name]["data_offsets"] = [begin, end]


def offsets(header, name):
    return header[name]["data_offsets"]


def shift_after(header, data, name, gap):
    """Insert ``gap`` unused bytes before tensor ``name``'s data."""
    begin = offsets(header, name)[0]
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= begin:
            info["data_offsets"] = [o + gap for o in info["data_offsets"]]
    return header, data[:begin] + b"\0" * gap + data[begin:]


def repeated_name(header, data):
    text = json.dumps(header)
    return text[:-1].encode() + f', "{Q_PROJ}": {json.dumps(header[Q_PROJ])}}}'.encode(), data


def edit_field(field, value):
    def edit(header, data):
        header[Q_PROJ][field] = value
        return header, data

    return edit


def drop_field(field):
    def edit(header, data):
        del header[Q_PROJ][field]
        return header, data

    return edit


def q_offsets(new):
    """Q_PROJ's data_offsets replaced by ``new(begin, end, bytes of data)``."""

    def edit(header, data):
        header[Q_PROJ]["data_offsets"] = new(*offsets(header, Q_PROJ), len(data))
        return header, data

    return edit


def raw_header(raw: bytes):
    return lambda header, data: (raw, data)


def o_shares_q_bytes(header, data):
    set_offsets(header, O_PROJ, *offsets(header, Q_PROJ))
    return header, data


def o_overlaps_q(header, data):
    begin = offsets(header, Q_PROJ)[0] + 8
    set_offsets(header, O_PROJ, begin, begin + 4096)
    return header, data


E = re.escape
FILE = r"model\.safetensors"
# case -> (edit of (header, data), the patterns the one line must match)
HEADERS = {
    "negative-offset": (
        q_offsets(lambda b, e, n: [-4, e - b - 4]),
        [FILE, rf"tensor '{E(Q_PROJ)}' has data_offsets \[-4, 4092\]; expected \[begin, end\]"],
    ),
    "range-shorter-than-shape": (
        q_offsets(lambda b, e, n: [b, e - 4]),
        [FILE, rf"tensor '{E(Q_PROJ)}' has .* 4092 bytes, but shape \(32, 32\) of F32 is 4096"],
    ),
    "range-longer-than-shape": (
        q_offsets(lambda b, e, n: [b, e + 4]),
        [FILE, rf"tensor '{E(Q_PROJ)}' has .* 4100 bytes, but shape \(32, 32\) of F32 is 4096"],
    ),
    "two-tensors-share-bytes": (
        o_shares_q_bytes,
        [FILE, rf"tensors '({E(Q_PROJ)}|{E(O_PROJ)})' and '({E(Q_PROJ)}|{E(O_PROJ)})' share bytes"],
    ),
    "ranges-overlap": (
        o_overlaps_q,
        [FILE, rf"tensors '{E(Q_PROJ)}' and '{E(O_PROJ)}' share bytes"],
    ),
    "range-past-end-of-file": (
        q_offsets(lambda b, e, n: [n + 64, n + 64 + e - b]),
        [FILE, rf"is truncated: .*tensor '{E(Q_PROJ)}' lies past its end"],
    ),
    "unused-bytes-between-tensors": (
        lambda h, d: shift_after(h, d, Q_PROJ, 8),
        [FILE, rf"data bytes \[\d+, \d+\) before tensor '{E(Q_PROJ)}' belong to no tensor"],
    ),
    "unused-bytes-at-the-end": (
        lambda h, d: (h, d + b"\0" * 8),
        [FILE, r"its last 8 bytes \(after tensor '[^']+'\) belong to no tensor"],
    ),
    "header-is-a-list": (raw_header(b"[1, 2]"), [FILE, "its header is a JSON list, not an object"]),
    "header-not-utf8": (raw_header(b'{"\xff": 1}'), [FILE, "its header is not UTF-8 text"]),
    "header-not-json": (raw_header(b'{"a": '), [FILE, "its header is not JSON"]),
    "header-names-a-tensor-twice": (repeated_name, [FILE, f"its header names '{E(Q_PROJ)}' twice"]),
    "metadata-not-strings": (
        lambda h, d: ({**h, "__metadata__": {"format": 1}}, d),
        [FILE, r"its __metadata__ is \{'format': 1\}, not an object of strings"],
    ),
    "entry-not-an-object": (
        lambda h, d: ({**h, Q_PROJ: [1, 2]}, d),
        [FILE, rf"tensor '{E(Q_PROJ)}' is described by \[1, 2\], not an object"],
    ),
    "no-shape": (drop_field("shape"), [FILE, rf"tensor '{E(Q_PROJ)}' has no shape"]),
    "no-dtype": (drop_field("dtype"), [FILE, rf"tensor '{E(Q_PROJ)}' has no dtype"]),
    "no-data-offsets": (
        drop_field("data_offsets"),
        [FILE, rf"tensor '{E(Q_PROJ)}' has no data_off"],
    ),
    "unknown-dtype": (
        edit_field("dtype", "Q7"),
        [FILE, rf"tensor '{E(Q_PROJ)}' has dtype 'Q7'; titan reads F64, F32"],
    ),
    "float-dims": (
        edit_field("shape", [32.0, 32]),
        [FILE, rf"tensor '{E(Q_PROJ)}' has shape \[32\.0, 32\]; expected a list of integers"],
    ),
    "string-dims": (
        edit_field("shape", ["32", 32]),
        [FILE, rf"'{E(Q_PROJ)}' has shape \['32', 32\]"],
    ),
    "negative-dims": (
        edit_field("shape", [-32, -32]),  # their product is right
        [FILE, rf"tensor '{E(Q_PROJ)}' has shape \[-32, -32\]; expected a list of integers >= 0"],
    ),
    "three-offsets": (
        q_offsets(lambda b, e, n: [b, e, 0]),
        [FILE, rf"tensor '{E(Q_PROJ)}' has data_offsets \[\d+, \d+, 0\]; expected \[begin, end\]"],
    ),
}


def hostile_file(good: dict[str, Path], tmp_path: Path, edit) -> Path:
    folder = tmp_path / "hostile"
    shutil.copytree(good["single"], folder)
    header, data = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", *edit(header, data))
    return folder


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("case", list(HEADERS))
def test_a_hostile_safetensors_header_is_refused(case, existing, good, tmp_path, capsys):
    edit, patterns = HEADERS[case]
    folder = hostile_file(good, tmp_path, edit)
    refuse_conversion(folder, tmp_path, capsys, existing, *patterns)


@pytest.mark.parametrize(
    ("length", "pattern"),
    [
        (10**6, r"is truncated: its header needs 1000008 bytes, the file has \d+"),
        (2**40, r"is not a safetensors file: its first 8 bytes give a header of 1099511627776"),
    ],
    ids=["longer-than-the-file", "over-the-format-limit"],
)
def test_a_header_length_beyond_the_file_is_refused(length, pattern, good, tmp_path, capsys):
    folder = tmp_path / "hostile"
    shutil.copytree(good["single"], folder)
    header, data = read_safetensors(folder / "model.safetensors")
    write_safetensors(folder / "model.safetensors", header, data, length=length)
    refuse_conversion(folder, tmp_path, capsys, False, FILE, pattern)


def test_a_valid_file_is_read_whatever_order_its_header_lists_tensors(good, tmp_path):
    """The byte ranges are checked in file order, whatever order the header lists them in."""
    folder = hostile_file(good, tmp_path, lambda h, d: (dict(reversed(h.items())), d))
    assert convert("hf-to-dcp", folder, tmp_path / "dcp") == 0


# ---- the shard index -------------------------------------------------------------------------


class OpenedFiles:
    """The paths a block opens (Python's ``open`` audit event: open, io.open, os.open)."""

    paths: list[str] | None = None

    @classmethod
    def hook(cls, event, args):
        if event == "open" and cls.paths is not None and isinstance(args[0], str | bytes | Path):
            cls.paths.append(os.path.realpath(os.fsdecode(args[0])))

    def __enter__(self):
        OpenedFiles.paths = []
        return OpenedFiles.paths

    def __exit__(self, *exc):
        OpenedFiles.paths = None


sys.addaudithook(OpenedFiles.hook)


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def with_weight_map(folder: Path, weight_map) -> None:
    index = {**index_of(folder), "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_moved_out(folder: Path, outside: Path, spelling: str) -> None:
    """SHARD moved to ``outside`` (a valid copy), the index naming it by ``spelling``, or a
    symlink left in its place."""
    outside.mkdir()
    (folder / SHARD).rename(outside / SHARD)
    if spelling == "symlink":
        (folder / SHARD).symlink_to(outside / SHARD)
        return
    name = {"dotdot": f"../{outside.name}/{SHARD}", "absolute": str(outside / SHARD)}[spelling]
    weight_map = {k: name if v == SHARD else v for k, v in index_of(folder)["weight_map"].items()}
    with_weight_map(folder, weight_map)


INDEX_FILE = r"model\.safetensors\.index\.json"
OUTSIDE = {
    "dotdot": rf"{INDEX_FILE}: shard '\.\./outside/{SHARD}' is not a file name in .*; titan "
    "reads no file outside the model folder",
    "absolute": rf"{INDEX_FILE}: shard '/.*/outside/{SHARD}' is not a file name in",
    "symlink": rf"{SHARD} is a symlink to .*/outside/{SHARD}, outside .*; titan reads no file "
    "outside the model folder",
}


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "existing-out"])
@pytest.mark.parametrize("spelling", list(OUTSIDE))
def test_a_shard_outside_the_folder_is_refused_unopened(spelling, existing, good, tmp_path, capsys):
    folder = tmp_path / "hostile"
    shutil.copytree(good["sharded"], folder)
    outside = tmp_path / "outside"
    shard_moved_out(folder, outside, spelling)
    with OpenedFiles() as opened:
        refuse_conversion(folder, tmp_path, capsys, existing, OUTSIDE[spelling])
    assert str((outside / SHARD).resolve()) not in opened


def test_a_single_file_linked_from_outside_is_refused_unopened(good, tmp_path, capsys):
    folder = tmp_path / "hostile"
    shutil.copytree(good["single"], folder)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model.safetensors").rename(outside)
    (folder / "model.safetensors").symlink_to(outside)
    with OpenedFiles() as opened:
        refuse_conversion(folder, tmp_path, capsys, False, r"model\.safetensors is a symlink to")
    assert str(outside.resolve()) not in opened


BAD_WEIGHT_MAPS = {
    "a-list": (lambda m: list(m), r"its weight_map is \[.*\], expected an object"),
    "missing": (lambda m: None, r"its weight_map is None, expected an object"),
    "a-number-for-a-file": (
        lambda m: {**m, Q_PROJ: 3},
        rf"weight_map\['{E(Q_PROJ)}'\] is 3, expected a",
    ),
    "null-for-a-file": (
        lambda m: {**m, Q_PROJ: None},
        rf"weight_map\['{E(Q_PROJ)}'\] is None, expected",
    ),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHT_MAPS))
def test_a_weight_map_that_is_not_names_to_files_is_refused(case, good, tmp_path, capsys):
    edit, pattern = BAD_WEIGHT_MAPS[case]
    folder = tmp_path / "hostile"
    shutil.copytree(good["sharded"], folder)
    with_weight_map(folder, edit(index_of(folder)["weight_map"]))
    refuse_conversion(folder, tmp_path, capsys, False, INDEX_FILE, pattern)


def test_a_hub_cache_snapshot_and_links_inside_the_folder_are_read(good, tmp_path):
    """The Hugging Face hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: allowed,
    as is a link to a file inside the folder."""
    repo = tmp_path / "models--tiny--llama"
    snapshot_dir = repo / "snapshots" / "0123abc"
    snapshot_dir.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(good["sharded"].iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot_dir / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    assert convert("hf-to-dcp", snapshot_dir, tmp_path / "from-cache") == 0
    inside = tmp_path / "inside"
    shutil.copytree(good["sharded"], inside)
    (inside / "real").mkdir()
    (inside / SHARD).rename(inside / "real" / SHARD)
    (inside / SHARD).symlink_to(Path("real", SHARD))
    assert convert("hf-to-dcp", inside, tmp_path / "from-inside") == 0


# ---- config.json numbers ---------------------------------------------------------------------


def rope_theta(value):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": value}}


LLAMA31 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
# case -> (config.json changes, key, the rest of the line after the key)
CONFIGS = {
    "hidden_size-zero": ({"hidden_size": 0}, "hidden_size", "is 0, expected a positive int"),
    "hidden_size-negative": ({"hidden_size": -32}, "hidden_size", "is -32, expected a positive"),
    "hidden_size-string": ({"hidden_size": "32"}, "hidden_size", "is '32', expected int"),
    "hidden_size-float": ({"hidden_size": 32.0}, "hidden_size", r"is 32\.0, expected int"),
    "hidden_size-bool": ({"hidden_size": True}, "hidden_size", "is True, expected int"),
    "heads-zero": ({"num_attention_heads": 0}, "num_attention_heads", "is 0, expected a positive"),
    "layers-negative": ({"num_hidden_layers": -1}, "num_hidden_layers", "is -1, expected a pos"),
    "ffn-float": ({"intermediate_size": 56.5}, "intermediate_size", r"is 56\.5, expected int"),
    "vocab-zero": ({"vocab_size": 0}, "vocab_size", "is 0, expected a positive int"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, "num_key_value_heads", "is 0, expected a pos"),
    "kv-heads-not-dividing": (
        {"num_key_value_heads": 3},
        "num_key_value_heads",
        "3 does not divide 'num_attention_heads' 4",
    ),
    "heads-not-dividing-hidden": (
        {"hidden_size": 30, "head_dim": None},
        "num_attention_heads",
        "4 does not divide 'hidden_size' 30 and no 'head_dim' is given",
    ),
    "head_dim-zero": ({"head_dim": 0}, "head_dim", "is 0, expected a positive int"),
    "context-zero": ({"max_position_embeddings": 0}, "max_position_embeddings", "is 0, expected"),
    "eps-zero": ({"rms_norm_eps": 0}, "rms_norm_eps", r"is 0\.0, expected a positive float"),
    "eps-nan": ({"rms_norm_eps": math.nan}, "rms_norm_eps", "is nan, expected a positive float"),
    "theta-negative": (rope_theta(-1.0), "rope_theta", r"is -1\.0, expected a positive float"),
    "theta-infinite": (rope_theta(math.inf), "rope_theta", "is inf, expected a positive float"),
    "rope-factor-zero": (
        {"rope_parameters": {**LLAMA31, "factor": 0}},
        r"rope_parameters\.factor",
        r"is 0\.0, expected a positive float",
    ),
    "rope-band-empty": (
        {"rope_parameters": {**LLAMA31, "high_freq_factor": 1.0}},
        r"rope_parameters\.high_freq_factor",
        r"1\.0 must be above rope_parameters\.low_freq_factor 1\.0",
    ),
    "tie-not-bool": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "is 'yes', expected"),
    "model_type-list": ({"model_type": ["llama"]}, "model_type", r"is \['llama'\], expected"),
}


def hostile_config(source: Path, folder: Path, changes: dict) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in {**config, **changes}.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config))  # NaN and Infinity as JSON allows
    return folder


def config_line(folder: Path, key: str, rest: str) -> str:
    return rf"^titan-\w+: error: {E(str(folder / 'config.json'))}: '?{key}'? {rest}"


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_number_is_refused_naming_file_and_key(case, good, tmp_path, capsys):
    changes, key, rest = CONFIGS[case]
    folder = hostile_config(good["single"], tmp_path / "hostile", changes)
    refuse_conversion(folder, tmp_path, capsys, True, config_line(folder, key, rest))


QWEN3_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize(
    ("changes", "key", "rest"),
    [
        ({"hidden_size": 0}, "hidden_size", "is 0, expected a positive int"),
        ({"num_key_value_heads": 3}, "num_key_value_heads", "3 does not divide"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps", "is nan, expected a positive float"),
        ({"head_dim": -8}, "head_dim", "is -8, expected a positive int"),
    ],
)
def test_qwen3_configs_get_the_same_checks(changes, key, rest, tmp_path, capsys):
    """The checks live in titan-core: every family's adapter gets them."""
    pytest.importorskip("titan_qwen3")
    folder = tmp_path / "qwen3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**QWEN3_CONFIG, **changes}))
    refuse_conversion(folder, tmp_path, capsys, False, config_line(folder, key, rest))


# ---- every reader refuses the same way -------------------------------------------------------


def sample(good: dict[str, Path], tmp_path: Path, kind: str) -> tuple[Path, str]:
    """One hostile folder of each kind, and the pattern of its refusal."""
    if kind == "header":
        edit, patterns = HEADERS["two-tensors-share-bytes"]
        return hostile_file(good, tmp_path, edit), patterns[1]
    if kind == "index":
        folder = tmp_path / "hostile"
        shutil.copytree(good["sharded"], folder)
        shard_moved_out(folder, tmp_path / "outside", "dotdot")
        return folder, OUTSIDE["dotdot"]
    folder = hostile_config(good["single"], tmp_path / "hostile", {"hidden_size": 0})
    return folder, rf"{E(str(folder / 'config.json'))}: 'hidden_size' is 0, expected a positive"


KINDS = ["header", "index", "config"]


@pytest.mark.parametrize("kind", KINDS)
def test_load_pretrained_refuses_hostile_folders(kind, good, tmp_path):
    folder, pattern = sample(good, tmp_path, kind)
    with pytest.raises(UserError, match=pattern):
        load_pretrained(folder)


@pytest.mark.parametrize("kind", KINDS)
def test_verify_refuses_hostile_folders(kind, good, tmp_path, capsys):
    folder, pattern = sample(good, tmp_path, kind)
    assert convert("verify", folder) == 2
    assert_one_line(capsys.readouterr().err, "titan-convert", pattern)


@pytest.mark.parametrize("kind", KINDS)
def test_training_from_hostile_hf_weights_is_refused(kind, good, tmp_path, capsys):
    folder, pattern = sample(good, tmp_path, kind)
    dump = tmp_path / "run"
    argv = ["--checkpoint.initial_load_path", str(folder), "--checkpoint.initial_load_in_hf"]
    capsys.readouterr()
    assert train_main([*argv, "--job.dump_folder", str(dump)]) == 2
    assert_one_line(capsys.readouterr().err, "titan-train", pattern)
    assert not dump.exists()

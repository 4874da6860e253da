"""Data a run cannot learn from, documents too long to tokenize at once, and `datasets`' noise.

Refusals go through ``titan-train`` itself (one line on stderr, exit 2, nothing written); the
tokenization of a huge document is checked against whole-document tokenization and by what it
costs, measured in a fresh process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, read_metrics, run_cli
from titan_core.data import load_tokenizer, open_documents
from titan_core.data import rows as rows_module
from titan_core.data.embedded import embedded_assets_dir
from titan_core.data.tokenizer import DocumentTokens, text_pieces
from titan_core.errors import UserError


def write_jsonl(path: Path, texts: list[str | None]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def assert_refused(tmp_path: Path, data: Path, needle: str) -> None:
    """titan-train on ``data``: exit 2, exactly one stderr line, the dump folder untouched."""
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "config.toml").write_text("# earlier run\n")
    # One short step: should the refusal regress, the test fails in seconds.
    args = [*FAST, "--training.steps", "1", "--training.dataset_path", str(data)]
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert proc.stderr.startswith(f"titan-train: error: training.dataset_path: {data}")
    assert needle in proc.stderr
    assert [p.name for p in dump.iterdir()] == ["config.toml"]
    assert (dump / "config.toml").read_text() == "# earlier run\n"


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    # `datasets` converts local files into its cache; keep those copies out of the user's cache.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# ---------------------------------------------------------------------------------------------
# data with no text


def test_all_empty_jsonl_is_refused_before_the_run_starts(tmp_path):
    data = write_jsonl(tmp_path / "empty_texts.jsonl", ["", "", ""])
    assert_refused(tmp_path, data, "holds no text: all 3 rows are empty or whitespace only")


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
@pytest.mark.parametrize(
    "name,content",
    [
        ("spaces.jsonl", [" ", "\t\n", ""]),
        ("nulls.jsonl", [None, None]),
        ("blank.txt", "\n  \n\t\n"),
    ],
)
def test_sources_without_text_are_refused_when_opened(tmp_path, name, content, streaming):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_jsonl(path, content)
    with pytest.raises(UserError, match=rf"dataset_path: {path} holds no text: all \d rows are"):
        open_documents("embedded", str(path), 0, streaming=streaming)


def test_a_stream_is_checked_by_its_first_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(rows_module, "TEXT_CHECK_ROWS", 4)
    late = write_jsonl(tmp_path / "late.jsonl", ["", "", "", "", "text at last"])
    with pytest.raises(UserError, match=r"late.jsonl holds no text: the first 4 rows are empty"):
        open_documents("embedded", str(late), 0, streaming=True)
    # Map-style sources are checked whole; a stream with text within the bound is kept as it is,
    # the rows read by the check included.
    assert open_documents("embedded", str(late), 0).num_documents == 5
    texts = ["", " ", "a", "", "b"]
    path = write_jsonl(tmp_path / "s.jsonl", texts)
    stream = open_documents("embedded", str(path), 0, streaming=True)
    assert [stream.get(i) for i in range(10)] == texts * 2


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_txt_blank_lines_are_not_documents(tmp_path, streaming):
    lines = ["first line", "", "   ", "second line", "\t", " third, indented", ""]
    path = tmp_path / "blank_lines.txt"
    path.write_text("\n".join(lines) + "\n\n")
    source = open_documents("embedded", str(path), 0, streaming=streaming)
    documents = [source.get(i) for i in range(3)]
    assert sorted(documents) == sorted(["first line", "second line", " third, indented"])
    if not streaming:
        assert source.num_documents == 3
    else:  # the stream's next epoch starts right after the third document
        assert [source.get(i) for i in range(3, 6)] == documents


# ---------------------------------------------------------------------------------------------
# huge documents


def test_piecewise_tokens_equal_whole_document_tokens():
    tok = load_tokenizer("")
    corpus = (embedded_assets_dir() / "corpus.jsonl").read_text().splitlines()
    # Real prose: punctuation, newlines, runs of spaces; 80 documents, cut into small pieces.
    text = "\n\n".join(json.loads(line)["text"] for line in corpus[:80])
    assert len(text) > 8000
    pieces = list(text_pieces(text, max_chars=2000))
    assert "".join(pieces) == text and len(pieces) > 5 and max(map(len, pieces)) <= 2000
    doc = DocumentTokens(text, tok, max_chars=2000)
    got, offset = [], 0
    while not doc.ends_at(offset):
        piece = doc.take(offset, 7)
        got += piece
        offset += len(piece)
    assert got == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert DocumentTokens("short text", tok).take(0, 100)[1:-1] == tok.encode("short text")


_MEASURE = """
import json, sys
from titan_core.data import GlobalBatchLoader, load_tokenizer, open_documents

def status_mib(field):
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith(field + ":"))
    return int(line.split()[1]) / 1024

tok = load_tokenizer("")
chars, encode = [0], tok.encode
def counting_encode(text):
    chars[0] += len(text)
    return encode(text)
tok.encode = counting_encode
source = open_documents("", sys.argv[1], 0)
source.get(0)  # the document's text is in memory before the baseline
# NOTE: opening a local file may convert it to Arrow first (a fresh datasets cache), a peak that
# is gone by now; "5" resets the process's peak RSS (VmHWM) so only the loader's use counts.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_mib("VmRSS")
loader = GlobalBatchLoader(
    source, tok, seq_len=64, global_batch_size=8, local_batch_size=8, dp_rank=0, dp_degree=1
)
loader.next_batch()
loader.next_batch()
print(json.dumps({"chars": chars[0], "growth_mib": status_mib("VmHWM") - before}))
"""


@pytest.fixture
def one_line_txt(tmp_path) -> Path:
    """A 24 MB .txt file that is one line, so one document."""
    words = "the quick brown fox, 42 jumps over lazy dogs. "
    path = tmp_path / "one_line.txt"
    path.write_text(words * (24_000_000 // len(words)) + "\n")
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_a_huge_document_is_tokenized_in_bounded_pieces(one_line_txt):
    # 2 steps of 8 rows x 65 tokens read ~1k tokens. Tokenizing the whole 24 MB line once per row
    # (as titan used to) took minutes and 5 GiB; one whole tokenization of 4 MB alone grows the
    # process by ~750 MiB with the embedded tokenizer.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(one_line_txt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.splitlines()[-1])
    size = one_line_txt.stat().st_size
    assert measured["chars"] <= size / 100, measured
    assert measured["growth_mib"] < 100, measured


def test_titan_train_runs_two_steps_on_a_huge_one_line_txt(one_line_txt, tmp_path):
    dump = tmp_path / "run"
    args = [*FAST, "--training.steps", "2", "--training.local_batch_size", "2"]
    args += ["--training.dataset_path", str(one_line_txt)]
    proc = run_cli([*args, "--job.dump_folder", str(dump)])
    assert proc.returncode == 0, proc.stderr
    assert [m["step"] for m in read_metrics(dump)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# `datasets` noise


def test_a_bad_jsonl_line_is_reported_once(tmp_path):
    data = tmp_path / "bad_line.jsonl"
    data.write_text('{"text": "fine"}\nthis line is not JSON\n')
    assert_refused(tmp_path, data, "could not be read as json (JSON parse error")


def test_datasets_prints_nothing_and_its_settings_are_restored(tmp_path, capfd):
    import datasets

    data = tmp_path / "bad_line.jsonl"
    data.write_text('{"text": "fine"}\nthis line is not JSON\n')
    log = logging.getLogger("datasets")
    handlers, bars_off = list(log.handlers), datasets.utils.are_progress_bars_disabled()
    for streaming in (False, True):
        with pytest.raises(UserError, match=r"bad_line.jsonl.*JSON parse error"):
            open_documents("embedded", str(data), 0, streaming=streaming)
    out = capfd.readouterr()
    assert out.out == "" and out.err == ""
    assert log.handlers == handlers and log.propagate
    assert datasets.utils.are_progress_bars_disabled() == bars_off

"""Tests for titan_core.data: embedded assets, tokenizers, sources and the global batch loader.

The loader is checked against a naive reference written here from the definition of the global
batch (row j reads documents j, j+G, j+2G, ... packed as [bos] text [eos]), for every DP layout.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from titan_core.data import (
    EMBEDDED_VOCAB_SIZE,
    GlobalBatchLoader,
    Tokenizer,
    embedded_assets_dir,
    load_tokenizer,
    open_documents,
)
from titan_core.data.embedded import ensure_built
from titan_core.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "packages" / "titan-core" / "src"


# ---------------------------------------------------------------------------------------------
# helpers


class CharTokenizer(Tokenizer):
    """One id per character (ord), with bos 0 and eos 1: token streams are easy to write by hand."""

    def __init__(self) -> None:
        self.vocab_size, self.bos_id, self.eos_id = 0x110000, 0, 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ListSource:
    """Document i is texts[i % n]: an unshuffled map-style source."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def get(self, index: int) -> str:
        return self.texts[index % len(self.texts)]


def reference_batches(source, tokenizer, G: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    """The global batch from its definition: (steps, G, seq_len + 1) windows."""
    rows = []
    for j in range(G):
        stream: list[int] = []
        k = 0
        while len(stream) < steps * (seq_len + 1):
            text = source.get(j + k * G)
            stream += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
            k += 1
        rows.append(stream[: steps * (seq_len + 1)])
    full = torch.tensor(rows).view(G, steps, seq_len + 1)
    return list(full.transpose(0, 1))


def make_loaders(source, tokenizer, G: int, D: int, b: int, seq_len: int, **kw):
    return [
        GlobalBatchLoader(
            source,
            tokenizer,
            seq_len=seq_len,
            global_batch_size=G,
            local_batch_size=b,
            dp_rank=r,
            dp_degree=D,
            **kw,
        )
        for r in range(D)
    ]


def global_step(loaders) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's microbatches in rank order: (G, seq_len) inputs and labels."""
    inputs, labels = [], []
    for loader in loaders:
        micro = loader.next_batch()
        assert len(micro) == loader.grad_accum_steps
        for x, y in micro:
            assert x.shape == y.shape == (loader.local_batch_size, loader.seq_len)
            assert x.dtype == y.dtype == torch.int64
            inputs.append(x)
            labels.append(y)
    return torch.cat(inputs), torch.cat(labels)


def merged_state(loaders) -> dict:
    state = loaders[0].state_dict()
    for loader in loaders[1:]:
        state["rows"].update(loader.state_dict()["rows"])
    return state


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return path


TEXTS = [f"document {i}: " + "word " * (i % 7) + "end." for i in range(23)]


@pytest.fixture(scope="session")
def assets() -> Path:
    # The real default cache: built once per machine (a few seconds), shared with other runs.
    return embedded_assets_dir()


@pytest.fixture(scope="session")
def tokenizer(assets) -> Tokenizer:
    return load_tokenizer("")


@pytest.fixture(scope="session")
def embedded(assets):
    return open_documents("embedded", "", seed=0)


# ---------------------------------------------------------------------------------------------
# embedded corpus and tokenizer


def test_embedded_tokenizer(tokenizer):
    assert tokenizer.vocab_size == EMBEDDED_VOCAB_SIZE == 2048
    assert (tokenizer.bos_id, tokenizer.eos_id) == (0, 1)
    sentence = "The quick brown fox jumps over the lazy dog, 42 times!"
    ids = tokenizer.encode(sentence)
    assert 0 < len(ids) < len(sentence)  # BPE merged something
    assert all(2 <= i < 2048 for i in ids)  # no BOS/EOS added
    assert tokenizer.decode(ids) == sentence


def test_embedded_corpus_and_cache(assets):
    docs = [json.loads(line)["text"] for line in (assets / "corpus.jsonl").open()]
    assert len(docs) > 1000
    assert all(len(d) >= 80 for d in docs)
    config = json.loads((assets / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|bos|>", "<|eos|>")
    start = time.perf_counter()
    assert embedded_assets_dir() == assets
    assert time.perf_counter() - start < 0.5


def _slow_build(folder: Path) -> None:
    with open(folder / "builds.log", "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    for name in ("corpus.jsonl", "tokenizer_config.json", "tokenizer.json"):
        (folder / name).write_text("{}")


def test_concurrent_processes_build_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=ensure_built, args=(tmp_path, _slow_build)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len((tmp_path / "builds.log").read_text().split()) == 1


def test_embedded_path_does_not_import_datasets(assets):
    code = (
        "import sys; from titan_core.data import open_documents, load_tokenizer;"
        "load_tokenizer(''); open_documents('embedded', '', 0).get(5);"
        "assert 'datasets' not in sys.modules, 'datasets was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


# ---------------------------------------------------------------------------------------------
# tokenizer folders


def _word_tokenizer_dir(folder: Path, vocab: dict[str, int]) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_hf_folder_special_tokens(tmp_path, assets):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((assets / "tokenizer.json").read_bytes())
    tok = load_tokenizer(str(folder))  # no tokenizer_config.json: found in the vocab
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (2048, 0, 1)
    # The config wins over the vocabulary guesses, in both the string and dict forms.
    config = {"bos_token": {"content": "<|eos|>"}, "eos_token": "<|bos|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    assert (tok.bos_id, tok.eos_id) == (1, 0)


def test_hf_folder_qwen_style_uses_eos_as_bos(tmp_path):
    folder = _word_tokenizer_dir(tmp_path / "m", {"[UNK]": 0, "hello": 1, "<|endoftext|>": 2})
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    tok = load_tokenizer(str(folder))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (2, 2, 3)
    assert tok.encode("hello") == [1]


def test_hf_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(
        UserError, match=f"model.hf_assets_path: {re.escape(str(missing))} is not a folder"
    ):
        load_tokenizer(str(missing))
    with pytest.raises(UserError, match=r"model.hf_assets_path: .* has no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    folder = _word_tokenizer_dir(tmp_path / "m", {"[UNK]": 0, "a": 1})
    with pytest.raises(UserError, match=r"model.hf_assets_path: no end-of-text token"):
        load_tokenizer(str(folder))


# ---------------------------------------------------------------------------------------------
# packing


def test_packing_by_hand():
    texts = ["ab", "cdef", "g", "hijklmn"]  # row 0 reads docs 0, 2, 0, ...; row 1 docs 1, 3, ...
    (loader,) = make_loaders(ListSource(texts), CharTokenizer(), G=2, D=1, b=2, seq_len=4)
    a, c, g = ord("a"), ord("c"), ord("g")
    ((x, y),) = loader.next_batch()
    # row 0 stream: [0 a b 1] [0 g 1] [0 a b 1] ...; windows of 5 tokens
    assert x[0].tolist() == [0, a, a + 1, 1]
    assert y[0].tolist() == [a, a + 1, 1, 0]
    assert x[1].tolist() == [0, c, c + 1, c + 2]
    ((x, y),) = loader.next_batch()
    assert x[0].tolist() == [g, 1, 0, a]  # continues where the last window ended
    assert y[0].tolist() == [1, 0, a, a + 1]
    assert loader.state_dict()["rows"] == {0: (2, 3), 1: (1, 4)}


def test_packing_matches_reference(tokenizer):
    source = ListSource(TEXTS)
    G, seq_len, steps = 3, 16, 12
    (loader,) = make_loaders(source, tokenizer, G=G, D=1, b=3, seq_len=seq_len)
    for ref in reference_batches(source, tokenizer, G, seq_len, steps):
        x, y = global_step([loader])
        assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])


def test_document_boundaries(tokenizer):
    # Every BOS in a row's token stream is followed by a whole document and its EOS.
    source = ListSource(TEXTS)
    (loader,) = make_loaders(source, tokenizer, G=2, D=1, b=2, seq_len=8)
    stream = []
    for _ in range(20):
        ((x, y),) = loader.next_batch()
        stream += torch.cat([x[0], y[0, -1:]]).tolist()
    starts = [i for i, t in enumerate(stream) if t == tokenizer.bos_id]
    for n, (s, e) in enumerate(itertools.pairwise(starts)):
        assert stream[e - 1] == tokenizer.eos_id
        assert tokenizer.decode(stream[s + 1 : e - 1]) == TEXTS[(2 * n) % len(TEXTS)]


# ---------------------------------------------------------------------------------------------
# layout independence and resume


@pytest.mark.parametrize("D,b", [(1, 8), (2, 4), (4, 2), (2, 2), (4, 1)])
def test_layout_independence(embedded, tokenizer, D, b):
    G, seq_len = 8, 32
    refs = reference_batches(embedded, tokenizer, G, seq_len, steps=5)
    loaders = make_loaders(embedded, tokenizer, G=G, D=D, b=b, seq_len=seq_len)
    assert loaders[0].grad_accum_steps == G // (D * b)
    for ref in refs:
        x, y = global_step(loaders)
        assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])


def test_loader_opens_embedded_and_seed_matters(embedded, tokenizer):
    kw = dict(seq_len=16, global_batch_size=4, local_batch_size=4, dp_rank=0, dp_degree=1)
    own = GlobalBatchLoader(None, tokenizer, seed=0, **kw).next_batch()[0][0]
    given = GlobalBatchLoader(embedded, tokenizer, **kw).next_batch()[0][0]
    other = GlobalBatchLoader(None, tokenizer, seed=1, **kw).next_batch()[0][0]
    assert torch.equal(own, given)
    assert not torch.equal(own, other)


def test_resume_same_and_other_layout(embedded, tokenizer):
    G, seq_len = 8, 24
    make = lambda D, b: make_loaders(embedded, tokenizer, G=G, D=D, b=b, seq_len=seq_len)  # noqa: E731
    run = make(2, 2)
    for _ in range(3):
        global_step(run)
    # Through JSON: the state is plain ints (int keys come back as strings, tuples as lists).
    state = json.loads(json.dumps(merged_state(run)))
    expected = [global_step(run) for _ in range(3)]
    # Fresh loaders in the same and other layouts, then the used loaders rewound (which must
    # drop their half-read documents).
    for resumed in [make(2, 2), make(4, 1), make(1, 8), run]:
        for loader in resumed:
            loader.load_state_dict(state)
        for x, y in expected:
            rx, ry = global_step(resumed)
            assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_errors(embedded, tokenizer):
    (l8,) = make_loaders(embedded, tokenizer, G=8, D=1, b=8, seq_len=8)
    (l4,) = make_loaders(embedded, tokenizer, G=4, D=1, b=4, seq_len=8)
    with pytest.raises(UserError, match=r"training.global_batch_size: .* for 4 rows, found 8"):
        l8.load_state_dict(l4.state_dict())
    half = make_loaders(embedded, tokenizer, G=8, D=2, b=4, seq_len=8)
    with pytest.raises(UserError, match=r"rows 0..7 of this rank are missing"):
        l8.load_state_dict({**half[1].state_dict(), "rows": {}})
    with pytest.raises(UserError, match=r"rows 0..3 of this rank are missing"):
        l8.load_state_dict(half[1].state_dict())


@pytest.mark.parametrize(
    "G,b,D", [(10, 4, 2), (8, 3, 1), (6, 1, 4)], ids=["G10b4D2", "G8b3D1", "G6b1D4"]
)
def test_bad_layout(embedded, tokenizer, G, b, D):
    with pytest.raises(UserError) as info:
        make_loaders(embedded, tokenizer, G=G, D=D, b=b, seq_len=8)
    msg = str(info.value)
    assert "training.global_batch_size" in msg and "training.local_batch_size" in msg
    assert f"data-parallel degree ({D})" in msg and "\n" not in msg


def test_bad_sizes(embedded, tokenizer):
    with pytest.raises(UserError, match=r"training.seq_len: expected a positive integer, found 0"):
        make_loaders(embedded, tokenizer, G=8, D=1, b=8, seq_len=0)


# ---------------------------------------------------------------------------------------------
# local files


def _epoch(source, n: int, epoch: int = 0) -> list[str]:
    return [source.get(epoch * n + i) for i in range(n)]


def _check_shuffled(path: Path, texts: list[str]) -> None:
    source = open_documents("embedded", str(path), seed=3)
    n = len(texts)
    first, second = _epoch(source, n), _epoch(source, n, 1)
    assert sorted(first) == sorted(second) == sorted(texts)
    assert first != texts and first != second  # each epoch is its own permutation
    assert _epoch(open_documents("embedded", str(path), seed=3), n) == first


def test_local_jsonl_parquet_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_shuffled(write_jsonl(tmp_path / "a.jsonl", TEXTS), TEXTS)
    pq.write_table(pa.table({"id": list(range(23)), "text": TEXTS}), tmp_path / "a.parquet")
    _check_shuffled(tmp_path / "a.parquet", TEXTS)
    lines = [t.replace(":", "") for t in TEXTS]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    _check_shuffled(tmp_path / "a.txt", lines)
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", TEXTS[10:])
    write_jsonl(folder / "a.jsonl", TEXTS[:10])
    _check_shuffled(folder, TEXTS)


def test_local_errors(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(
        UserError, match=f"training.dataset_path: {re.escape(str(missing))} does not exist"
    ):
        open_documents("embedded", str(missing), 0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"training.dataset_path: .*empty.jsonl is empty"):
        open_documents("embedded", str(tmp_path / "empty.jsonl"), 0)
    write_jsonl(tmp_path / "other.jsonl", ["x", "y"], key="content")
    with pytest.raises(UserError, match=r'training.dataset_path: .* no "text" column \(found: con'):
        open_documents("embedded", str(tmp_path / "other.jsonl"), 0)
    (tmp_path / "bad.jsonl").write_text("this is not json\n")
    with pytest.raises(UserError, match=r"training.dataset_path: .*bad.jsonl could not be read"):
        open_documents("embedded", str(tmp_path / "bad.jsonl"), 0)
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"training.dataset_path: .*x.csv has suffix \.csv"):
        open_documents("embedded", str(tmp_path / "x.csv"), 0)
    with pytest.raises(UserError, match=r"training.dataset_path: .* mixes file kinds"):
        (tmp_path / "a.txt").write_text("hello\n")
        open_documents("embedded", str(tmp_path), 0)


# ---------------------------------------------------------------------------------------------
# streaming


def test_streaming_source_order(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", TEXTS)
    source = open_documents("embedded", str(path), 0, streaming=True)
    # No shuffle: the file order, repeated each epoch; far indices just skip forward.
    assert [source.get(i) for i in range(50)] == [TEXTS[i % 23] for i in range(50)]
    assert source.get(23 * 7 + 5) == TEXTS[5]


def test_streaming_loader_and_resume(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "s.jsonl", TEXTS)
    G, seq_len = 4, 16
    kw = dict(dataset_path=str(path), streaming=True)
    make = lambda: make_loaders(None, tokenizer, G=G, D=2, b=1, seq_len=seq_len, **kw)  # noqa: E731
    loaders = make()
    refs = reference_batches(ListSource(TEXTS), tokenizer, G, seq_len, steps=12)
    for ref in refs[:6]:
        x, y = global_step(loaders)
        assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])
    resumed = make()
    for loader in resumed:
        loader.load_state_dict(merged_state(loaders))
    for ref in refs[6:]:
        x, y = global_step(resumed)
        assert torch.equal(x, ref[:, :-1]) and torch.equal(y, ref[:, 1:])
    # After skipping ahead on resume, each rank keeps only documents its rows will still read.
    for loader in resumed:
        positions = loader.state_dict()["rows"]
        for index in loader._source._cache:
            assert index % G in positions and index // G >= positions[index % G][0]
    # The loader never asks a stream for a document twice (that would restart the stream).
    assert "restarts the stream" not in caplog.text

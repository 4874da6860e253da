"""Streams at scale: each data-parallel rank reads only its share, and resumes without re-reading.

A local folder of parquet shards read through the `datasets` streaming reader stands in for a hub
dataset; four data-parallel ranks are four loaders in this process, and each stream counts the
rows it takes from `datasets`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from titan_core.data import GlobalBatchLoader, load_tokenizer

SHARDS, ROWS = 16, 40  # shards (files) x rows per shard
G, D, B, SEQ = 8, 4, 2, 32


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("")


def write_shards(folder: Path, shards: int = SHARDS, rows: int = ROWS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        texts = [f"shard {s} row {i}: " + "word " * ((s + i) % 9) + "end." for i in range(rows)]
        pq.write_table(pa.table({"text": texts}), folder / f"part-{s:03d}.parquet")
    return folder


def loaders(tokenizer, data: Path, degree: int = D, **kw) -> list[GlobalBatchLoader]:
    return [
        GlobalBatchLoader(
            None,
            tokenizer,
            seq_len=SEQ,
            global_batch_size=G,
            local_batch_size=B,
            dp_rank=r,
            dp_degree=degree,
            dataset_path=str(data),
            streaming=True,
            **kw,
        )
        for r in range(degree)
    ]


def step(ranks: list[GlobalBatchLoader]) -> torch.Tensor:
    """The global batch of one step: every rank's inputs, in rank order."""
    return torch.cat([x for loader in ranks for x, _ in loader.next_batch()])


def rows_read(ranks) -> int:
    return sum(loader._source.rows_read for loader in ranks)


def consumed(ranks) -> int:
    """Documents the rows have started (each is one row of the data)."""
    return sum(k + (offset > 0) for r in ranks for k, offset in r.state_dict()["rows"].values())


def checkpoint(ranks) -> dict:
    """The merged loader state, through JSON as titan.json stores it."""
    state = ranks[0].state_dict()
    for loader in ranks[1:]:
        other = loader.state_dict()
        state["rows"].update(other["rows"])
        state["streams"].update(other["streams"])
    return json.loads(json.dumps(state))


def test_each_rank_reads_only_its_shards(tokenizer, tmp_path):
    ranks = loaders(tokenizer, write_shards(tmp_path / "data"))
    assert all(loader._source.per_rank for loader in ranks)
    for _ in range(40):
        step(ranks)
    used = consumed(ranks)
    assert used > 2 * ROWS * D  # several shards per rank were read
    assert rows_read(ranks) <= 1.25 * used, (rows_read(ranks), used)


def test_fewer_shards_than_ranks_read_the_whole_stream_on_every_rank(tokenizer, tmp_path, caplog):
    """The contrast (and the layout-independent fallback): 2 shards for 4 ranks."""
    with caplog.at_level(logging.WARNING, logger="titan"):
        ranks = loaders(tokenizer, write_shards(tmp_path / "data", shards=2, rows=8 * ROWS))
    assert "fewer than the 4 data-parallel ranks" in caplog.text
    for _ in range(40):
        step(ranks)
    assert rows_read(ranks) > 3 * consumed(ranks)


@pytest.mark.parametrize("shuffle", [0, 8], ids=["in-order", "shuffle-buffer-8"])
def test_a_late_resume_reads_at_most_one_shard_again(tokenizer, tmp_path, shuffle):
    data = write_shards(tmp_path / "data")
    straight = loaders(tokenizer, data, shuffle_buffer=shuffle)
    expected = [step(straight) for _ in range(50)]

    first = loaders(tokenizer, data, shuffle_buffer=shuffle)
    for _ in range(40):
        step(first)
    state, before = checkpoint(first), consumed(first)

    resumed = loaders(tokenizer, data, shuffle_buffer=shuffle)
    opened = rows_read(resumed)  # opening a stream checks its first row for text
    for loader in resumed:
        loader.load_state_dict(state)
    for i in range(40, 50):
        assert torch.equal(step(resumed), expected[i]), f"step {i + 1}"
    extra = rows_read(resumed) - opened - (consumed(resumed) - before)
    # NOTE: `datasets` also skips, inside the shard it resumes in, the rows before the position
    # (reading at most that shard); the rows counted here are those handed to titan again.
    assert extra <= ROWS, extra


def test_a_resume_under_another_degree_says_the_order_changes(tokenizer, tmp_path, caplog):
    data = write_shards(tmp_path / "data")
    first = loaders(tokenizer, data)
    for _ in range(5):
        step(first)
    state = checkpoint(first)
    batches = []
    for _ in range(2):  # deterministic: two resumes under 2 ranks give the same batches
        caplog.clear()
        ranks = loaders(tokenizer, data, degree=2)
        with caplog.at_level(logging.WARNING, logger="titan"):
            for loader in ranks:
                loader.load_state_dict(state)
        assert "split over 4 data-parallel rank(s) when saved and over 2 now" in caplog.text
        batches.append([step(ranks) for _ in range(3)])
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a, b)


# ---- the trainer: a streamed dataset under FSDP 2, resumed ---------------------------------


@pytest.mark.distributed
def test_a_streamed_run_resumes_exactly_under_fsdp(tmp_path):
    """training.dataset_streaming: 2 data-parallel ranks read their own shards; a run resumed at
    step 4 has an uninterrupted run's losses, and its checkpoint holds each rank's stream position.
    """
    import shutil

    from helpers import FAST, losses, run_cli

    data = write_shards(tmp_path / "data")
    args = [
        *FAST, "--training.dataset_path", str(data), "--training.dataset_streaming",
        "--training.global_batch_size", "8", "--training.local_batch_size", "4",
        "--checkpoint.enable", "--checkpoint.interval", "4",
    ]  # fmt: skip
    full = tmp_path / "full"
    proc = run_cli([*args, "--job.dump_folder", str(full)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((full / "checkpoint" / "step-4" / "titan.json").read_text())
    streams = meta["loader"]["streams"]
    assert sorted(streams) == ["0", "1"] and all(p["per_rank"] for p in streams.values())

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoint" / "step-8")
    lines = (resumed / "metrics.jsonl").read_text().splitlines(keepends=True)[:4]
    (resumed / "metrics.jsonl").write_text("".join(lines))
    proc = run_cli([*args, "--job.dump_folder", str(resumed)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(resumed) == losses(full)


def test_dataset_streaming_needs_a_path(tmp_path, capsys):
    from titan_core.train import main

    assert main(["--training.dataset_streaming", "--job.dump_folder", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.dataset_streaming:" in err[0]
    assert not (tmp_path / "x").exists()


# ---- prefetching -----------------------------------------------------------------------------


def test_prefetched_batches_and_states_are_the_loaders_own(tokenizer, tmp_path):
    """The thread prepares batches ahead, but a checkpoint taken after batch n resumes at n + 1."""
    from titan_core.data.prefetch import Prefetcher

    data = write_shards(tmp_path / "data")
    plain = loaders(tokenizer, data, degree=1)[0]
    ahead = Prefetcher(loaders(tokenizer, data, degree=1)[0], depth=3)
    try:
        for _ in range(6):
            for (x, y), (u, v) in zip(plain.next_batch(), ahead.next_batch(), strict=True):
                assert torch.equal(x, u) and torch.equal(y, v)
            assert ahead.state_dict() == plain.state_dict()
            ahead.state_dict()["rows"].clear()  # a caller's change is its own
            assert ahead.state_dict() == plain.state_dict()
        assert ahead.loader._source.rows_read > plain._source.rows_read  # it did read ahead
        assert ahead.take_wait() > 0 and ahead.wait_seconds == 0
    finally:
        ahead.close()


def test_a_data_error_in_the_thread_reaches_the_training_loop(tokenizer):
    from titan_core.data.prefetch import Prefetcher
    from titan_core.errors import UserError

    class Broken:
        def get(self, index: int) -> str:
            raise UserError("training.dataset_path: row 3 cannot be read")

        pass_length = None

    loader = GlobalBatchLoader(Broken(), tokenizer, seq_len=SEQ, global_batch_size=2,
                               local_batch_size=2, dp_rank=0, dp_degree=1)  # fmt: skip
    ahead = Prefetcher(loader, depth=2)
    with pytest.raises(UserError, match="row 3 cannot be read"):
        ahead.next_batch()
    ahead.close()


# ---- the shuffle buffer ----------------------------------------------------------------------


def served(data: Path, shuffle: int, seed: int, n: int) -> list[str]:
    from titan_core.data.sources import open_documents

    source = open_documents("", str(data), seed, streaming=True, shuffle_buffer=shuffle)
    return [source.get(i) for i in range(n)]


def test_the_shuffle_buffer_permutes_each_block_by_the_seed(tmp_path):
    data = write_shards(tmp_path / "data", shards=2)
    plain = served(data, 0, 0, 48)
    once, again, other = (served(data, 16, seed, 48) for seed in (0, 0, 1))
    assert once == again and once != other  # seeded
    for block in range(3):  # each block of 16 is its own stream block, reordered
        window = slice(16 * block, 16 * (block + 1))
        assert sorted(once[window]) == sorted(plain[window]) and once[window] != plain[window]


def test_shuffle_buffer_is_refused_where_there_is_no_stream(tmp_path, capsys):
    from titan_core.train import main

    dump = tmp_path / "x"
    assert main(["--training.shuffle_buffer", "64", "--job.dump_folder", str(dump)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.shuffle_buffer: 64 shuffles streams" in err[0]
    assert not dump.exists()

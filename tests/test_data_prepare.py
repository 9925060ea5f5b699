"""`gptmini prepare`: shards that decode back to the text, open anywhere, split by chunks, written atomically."""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydoc_data import topics

from gptmini.cli.prepare import main as prepare_main
from gptmini.data.loader import TokenShards
from gptmini.data.prepare import SPLIT_CHARS, PrepareConfig, SplitRule, prepare
from gptmini.data.sources import DataError, split_text
from gptmini.tokenizer import get_tokenizer

EOT = get_tokenizer().eot_token


def config(tmp_path: Path, *sources: str, **kw) -> PrepareConfig:
    kw.setdefault("workers", 1)
    return PrepareConfig(list(sources), tmp_path / "out", cache_dir=tmp_path / "cache", **kw)


def documents(tokens: np.ndarray) -> list[str]:
    """The decoded documents of a token stream, each ended by EOT."""
    assert tokens[-1] == EOT
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [get_tokenizer().decode(tokens[a:b]) for a, b in zip(starts, ends)]


def stream(out: Path, split: str) -> np.ndarray:
    shards = TokenShards.open(out, split)
    return np.asarray(shards[0 : len(shards)])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("embedded")
    prepare(config(tmp, "embedded:python-docs", val_fraction=0.1))
    return tmp / "out"


def dealt(docs: dict[str, str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train pieces, val pieces): each named text cut into chunks and dealt by its name and chunk index, a
    split's adjacent chunks joined."""
    rule, pieces = SplitRule(val_fraction), ([], [])
    for name, text in docs.items():
        split_of, last = rule.document(name), None
        for i, chunk in enumerate(split_text(text, SPLIT_CHARS)):
            split = split_of(i)
            if split == last:
                pieces[split][-1] += chunk
            else:
                pieces[split].append(chunk)
            last = split
    return pieces


def test_embedded_corpus_shards_decode_back_to_the_source_text(embedded):
    texts = [topics.topics[k] for k in sorted(topics.topics)]
    train, val = dealt({f"embedded:python-docs/{k}": topics.topics[k] for k in sorted(topics.topics)}, 0.1)
    assert documents(stream(embedded, "train")) == train
    assert documents(stream(embedded, "val")) == val
    assert sum(map(len, train + val)) == sum(map(len, texts))  # every character in exactly one split
    assert all(any(piece in t for t in texts) for piece in val)  # a val piece is text that was next to itself
    manifest = json.loads((embedded / "manifest.json").read_text())
    assert manifest["splits"]["val"]["chunks"] > 0 and manifest["documents"] == len(texts)
    assert (manifest["tokenizer"], manifest["n_vocab"], manifest["vocab_size"]) == ("cl100k_base", 100277, 100352)


@pytest.mark.parametrize("val_fraction", [0.05, 0.1, 0.2])
def test_val_holds_val_fraction_of_the_tokens_whatever_the_document_sizes(tmp_path, val_fraction):
    # One document of 600 KB and 300 of a few words: a split by whole documents would put 0% or 90% in val.
    (tmp_path / "big.txt").write_text(" ".join(f"word{i % 977} and more text" for i in range(30_000)))
    for i in range(300):
        (tmp_path / f"small{i:03d}.txt").write_text(f"note {i}: a short document.")
    manifest = prepare(config(tmp_path, str(tmp_path / "*.txt"), val_fraction=val_fraction)).manifest
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val / (train + val) == pytest.approx(val_fraction, rel=0.2)


def test_embedded_corpus_val_holds_five_percent_of_the_tokens(tmp_path):
    manifest = prepare(config(tmp_path, "embedded:python-docs")).manifest
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val / (train + val) == pytest.approx(0.05, rel=0.2)


def test_a_one_file_corpus_gets_both_splits(tmp_path):
    # 22 KB of CRLF text in one file (21 chunks): by whole documents it was all val and no train.
    (tmp_path / "notes.txt").write_bytes(b"".join(b"line %d of a small notes file\r\n" % i for i in range(700)))
    manifest = prepare(config(tmp_path, str(tmp_path / "notes.txt"))).manifest
    assert manifest["splits"]["train"]["tokens"] > 0 and manifest["splits"]["val"]["tokens"] > 0


def test_shards_open_with_plain_pyarrow_polars_and_duckdb(embedded):
    import duckdb
    import polars as pl

    manifest = json.loads((embedded / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    path = str(embedded / shard["file"])
    table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    assert table.schema.field("tokens").type == pa.uint32() and table.num_rows == shard["tokens"]
    frame = pl.read_ipc(path)
    assert frame["tokens"].dtype == pl.UInt32 and frame.height == shard["tokens"]
    assert frame["tokens"].to_numpy()[:100].tolist() == table.column("tokens").to_pylist()[:100]
    con = duckdb.connect()
    con.register("shard", table)  # duckdb reads Arrow through its Arrow scan
    assert con.execute("select count(*), max(tokens) from shard").fetchone() == (shard["tokens"], int(table.column(0).to_numpy().max()))


def test_manifest_records_sha256_token_counts_and_provenance(embedded):
    manifest = json.loads((embedded / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = embedded / shard["file"]
            assert shard["sha256"].startswith(shard["file"].split("-")[2].removesuffix(".arrow"))
            assert path.stat().st_size == shard["bytes"]
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
    [source] = manifest["sources"]
    assert source["spec"] == "embedded:python-docs" and len(source["inputs"][0]["sha256"]) == 64


def test_rerun_with_the_same_inputs_is_a_no_op(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world, " * 50)
    argv = [str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--workers", "1", "--cache-dir", str(tmp_path / "c")]
    assert prepare_main(argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert prepare_main(argv) == 0
    assert "is up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before


def test_changed_input_rewrites_and_removes_the_stale_shards(tmp_path):
    (tmp_path / "a.txt").write_text("first version " * 20)
    first = prepare(config(tmp_path, str(tmp_path / "a.txt"), val_fraction=0.0)).manifest
    (tmp_path / "a.txt").write_text("second version " * 20)
    second = prepare(config(tmp_path, str(tmp_path / "a.txt"), val_fraction=0.0)).manifest
    assert first["input_key"] != second["input_key"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["manifest.json", second["splits"]["train"]["shards"][0]["file"]])
    assert documents(stream(tmp_path / "out", "train")) == ["second version " * 20]


def test_shards_hold_at_most_shard_tokens_and_join_into_the_same_stream(tmp_path, embedded):
    prepare(config(tmp_path, "embedded:python-docs", val_fraction=0.1, shard_tokens=10_000))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sizes = [s["tokens"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) > 5 and max(sizes) == 10_000 and sum(sizes) == manifest["splits"]["train"]["tokens"]
    assert np.array_equal(stream(tmp_path / "out", "train"), stream(embedded, "train"))


def test_several_worker_processes_write_the_same_shards_as_one(tmp_path, embedded):
    res = prepare(config(tmp_path, "embedded:python-docs", val_fraction=0.1, workers=2, inline_bytes=0))
    one = json.loads((embedded / "manifest.json").read_text())
    assert res.workers == 2 and res.manifest["splits"] == one["splits"]


def test_empty_corpus_is_an_error(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("   \n\n")
    argv = [str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "1", "--cache-dir", str(tmp_path / "c")]
    assert prepare_main(argv) == 2  # bad input
    err = capsys.readouterr().err
    assert "the corpus is empty: 2 document(s), all empty or whitespace-only" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no scratch or temp files left


def test_whitespace_documents_are_skipped_and_counted_in_the_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("\n \n")
    (tmp_path / "b.txt").write_text("some text")
    (tmp_path / "c.txt").write_bytes(b"bad \xff byte")
    manifest = prepare(config(tmp_path, str(tmp_path), val_fraction=0.0)).manifest
    assert manifest["stats"] == {"documents": 2, "empty_documents": 1, "replaced_bytes": 1, "skipped_files": 0}
    assert documents(stream(tmp_path / "out", "train")) == ["some text", "bad \ufffd byte"]


def test_a_failure_midway_leaves_the_previous_output_intact(tmp_path):
    (tmp_path / "good.txt").write_text("good text " * 100)
    (tmp_path / "more.txt").write_text("more text " * 100)
    old = prepare(config(tmp_path, str(tmp_path / "good.txt"), val_fraction=0.0)).manifest
    (tmp_path / "zz.txt").write_bytes(b"text then binary \0\1\2")
    with pytest.raises(DataError, match=r"zz\.txt looks binary"):  # after a first shard of new text is written
        prepare(config(tmp_path, str(tmp_path / "good.txt"), str(tmp_path / "more.txt"), str(tmp_path / "zz.txt"),
                       val_fraction=0.0, shard_tokens=50))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == old
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", old["splits"]["train"]["shards"][0]["file"]]
    TokenShards.open(tmp_path / "out", "train")  # still verifies


def test_a_single_huge_line_is_streamed_in_bounded_memory(tmp_path):
    line = ("lorem ipsum dolor sit amet " * 900_000).encode()  # 24 MB, no newline
    (tmp_path / "big.txt").write_bytes(line)
    get_tokenizer()  # the 100k-entry BPE table (~12 MB) is loaded once per process, not per input
    tracemalloc.start()
    try:
        res = prepare(config(tmp_path, str(tmp_path / "big.txt"), val_fraction=0.0, chunk_chars=1 << 16))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(line) / 4, f"peak {peak / 1e6:.1f} MB of Python memory for a {len(line) / 1e6:.1f} MB line"
    tokens = stream(tmp_path / "out", "train")
    assert res.manifest["splits"]["train"]["tokens"] == len(tokens)
    assert get_tokenizer().decode_bytes(tokens[:-1]) == line  # and nothing was lost at the chunk seams


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val-fraction", "1.5"], "--val-fraction 1.5 is outside [0, 1)"),
        (["--shard-tokens", "0"], "--shard-tokens 0 must be >= 1"),
        (["--tokenizer", "bpe-9000"], "--tokenizer: unknown tokenizer 'bpe-9000'; choose one of: cl100k_base"),
        ([], None),
    ],
)
def test_bad_options_are_named(tmp_path, capsys, args, message):
    sources = ["embedded:python-docs"] if message else []
    rc = prepare_main([*sources, "--out", str(tmp_path / "o"), "--workers", "1", *args])
    assert rc == 2  # bad input
    assert (message or "no sources given") in capsys.readouterr().err


def test_cli_entry_point_runs_prepare(tmp_path):
    from gptmini.cli import main

    (tmp_path / "a.md").write_text("# Title\n\nSome markdown text.\n")
    assert main(["prepare", str(tmp_path / "a.md"), "--out", str(tmp_path / "out"), "--workers", "1",
                 "--val-fraction", "0", "--cache-dir", str(tmp_path / "c")]) == 0
    assert documents(stream(tmp_path / "out", "train")) == ["# Title\n\nSome markdown text.\n"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "out"))


def test_the_gptmini_command_exits_non_zero_with_the_message(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gptmini.cli", "prepare", "s3://bucket/x.txt", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # bad input
    assert proc.stderr.strip().splitlines()[-1] == (
        "gptmini prepare: error: unknown source scheme 's3' in 's3://bucket/x.txt'; use wikipedia:TITLE, "
        "http(s)://URL, embedded:python-docs, or a local file, folder or glob")

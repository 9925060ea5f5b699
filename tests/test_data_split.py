"""A growing corpus: the split of a chunk depends only on its document and its index, each input is
tokenized once (the token cache), and the manifest marks what is new since an earlier dataset."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gptmini.data.loader import TokenShards
from gptmini.data.prepare import FORMAT, PrepareConfig, SplitRule, new_ranges, prepare, read_manifest
from gptmini.data.sources import DataError
from gptmini.tokenizer import get_tokenizer

EOT = get_tokenizer().eot_token


def write_doc(folder: Path, name: str, lines: int, version: str = "") -> None:
    # Every line names its document, so a decoded piece says where it came from.
    (folder / f"{name}.txt").write_text("".join(f"{name}{version} line {i} says something plain.\n"
                                                for i in range(lines)))


def pieces(out: Path, split: str) -> list[str]:
    shards = TokenShards.open(out, split)
    tokens = np.asarray(shards[0:len(shards)])
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [get_tokenizer().decode(tokens[a:b]) for a, b in zip(starts, ends)]


def by_document(out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each document's (train pieces, val pieces), in order."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for i, split in enumerate(("train", "val")):
        for piece in pieces(out, split):
            found.setdefault(re.search(r"(doc_\w+) line", piece).group(1), ([], []))[i].append(piece)
    return found


def prepare_folder(tmp_path: Path, corpus: Path, out: str) -> dict:
    # A token cache of its own: the split itself is under test, not tokens kept from the first run.
    cfg = PrepareConfig([str(corpus)], tmp_path / out, workers=1, cache_dir=tmp_path / f"cache-{out}", val_fraction=0.1)
    return prepare(cfg).manifest


def test_adding_changing_and_removing_documents_moves_no_chunk_between_the_splits(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, name in enumerate(["doc_b", "doc_d", "doc_f", "doc_h", "doc_j"]):
        write_doc(corpus, name, 320 + 100 * k)  # 11 to 25 chunks of 1024 characters each
    prepare_folder(tmp_path, corpus, "out")
    before = by_document(tmp_path / "out")
    assert all(val for _, val in before.values())  # every document has val chunks to keep

    write_doc(corpus, "doc_a", 400)  # first in the file order: it used to shift every later chunk
    write_doc(corpus, "doc_e", 150)
    write_doc(corpus, "doc_d", 260, version="v2")  # changed
    (corpus / "doc_h.txt").unlink()  # removed
    prepare_folder(tmp_path, corpus, "out2")
    after = by_document(tmp_path / "out2")
    for name in ("doc_b", "doc_f", "doc_j"):
        assert after[name] == before[name], name  # the same chunks in train and in val, cut the same way
    assert "doc_h" not in after and "doc_dv2" in after and after["doc_a"][1] and "doc_e" in after


def test_split_rule_deals_one_chunk_in_1_over_f_within_each_document():
    rule = SplitRule(0.05)
    for name in ("a.txt", "/data/b.txt", "embedded:python-docs/if"):
        split = rule.document(name)
        for n in (20, 57, 400):
            assert sum(split(i) for i in range(n)) in (n // 20, -(-n // 20))
    # one-chunk documents: val with probability f over many names
    assert sum(rule.document(f"note{i}")(0) for i in range(4000)) / 4000 == pytest.approx(0.05, abs=0.015)


def test_a_grown_folder_tokenizes_only_the_new_file_and_the_manifest_names_it(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("doc_a", "doc_b", "doc_c"):
        write_doc(corpus, name, 300)
    first = prepare(PrepareConfig([str(corpus)], tmp_path / "v1", workers=1, cache_dir=tmp_path / "cache",
                                  val_fraction=0.1))
    assert first.tokenized_inputs == 3
    write_doc(corpus, "doc_new", 300)
    second = prepare(PrepareConfig([str(corpus)], tmp_path / "v2", workers=1, cache_dir=tmp_path / "cache",
                                   val_fraction=0.1, since=tmp_path / "v1"))
    m = second.manifest
    assert second.tokenized_inputs == 1 and m["tokenized_inputs"] == 1
    assert [(Path(r["ids"][0]).name, r["cached"], r["new"]) for r in m["inputs"]] == [
        ("doc_a.txt", True, False), ("doc_b.txt", True, False), ("doc_c.txt", True, False),
        ("doc_new.txt", False, True)]
    assert m["since"]["input_key"] == first.manifest["input_key"]
    assert (m["since"]["new_inputs"], m["since"]["new_documents"]) == (1, 1)
    # The new file's tokens sit where the manifest says, in both splits.
    for split in ("train", "val"):
        shards = TokenShards.open(tmp_path / "v2", split)
        [(a, b)] = new_ranges(m, split)
        text = get_tokenizer().decode([t for t in shards[a:b].tolist() if t != EOT])
        assert set(re.findall(r"(doc_\w+) line", text)) == {"doc_new"}
    # ... and the shards are exactly those of tokenizing everything afresh.
    fresh = prepare(PrepareConfig([str(corpus)], tmp_path / "fresh", workers=1, cache_dir=tmp_path / "other",
                                  val_fraction=0.1))
    assert fresh.tokenized_inputs == 4
    assert [s["sha256"] for s in fresh.manifest["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in m["splits"]["train"]["shards"]]
    assert fresh.manifest["splits"]["val"]["tokens"] == m["splits"]["val"]["tokens"]


def test_a_manifest_of_the_old_format_says_to_prepare_again(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "gptmini-tokens/1", "splits": {}}))
    with pytest.raises(DataError) as err:
        read_manifest(tmp_path)
    assert "earlier gptmini" in str(err.value) and f"--out {tmp_path} --force" in str(err.value)
    assert FORMAT in str(err.value)

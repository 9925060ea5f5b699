"""Retrieval: the index of the train passages (build, determinism, incremental update, no val text), exact
retrieval of a planted passage, retrieval-conditioned generation against the passage prepended by hand, the
four evaluation figures, and the bad inputs. And, end to end, the vector-store search and a cited completion through the `openai` client, and a promotion
swapping model and index together; the HTTP bad-input rows are in tests/test_serve.py's table."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import httpx
import pytest
import torch

from gptmini import rag, registry, retrieval
from gptmini.checkpoint import load_model
from gptmini.config import model_preset
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer, padded_vocab_size
from gptmini.weights import save_pretrained
from gptmini.cli.prepare import main as prepare_main
from gptmini.data.prepare import SplitRule
from gptmini.data.sources import Stats, open_source
from gptmini.generate import generate, sampling_mask
from gptmini.retrieval import Index, build_index
from gptmini.server import ModelHost, ServeConfig
from serve_helpers import Server

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = "The quokka zyzzyva protocol binds every marmoset socket to the ninth velvet port."
WORDS = ("python list tuple dict loop class method module import yield lambda scope frame object type value "
         "string bytes number float iterator generator exception context manager decorator attribute").split()


def write_corpus(folder: Path, names: list[str]) -> None:
    """Documents of plain sentences, distinct per name; `planted.txt` holds PLANTED at the start of its first
    train chunk after the first (a chunk's split depends on the document's name and the chunk's index only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        words = [WORDS[(i * (n + 3) + n) % len(WORDS)] for i in range(1200)]
        path = folder / name
        path.write_text(text := " ".join(words))
        if name == "planted.txt":
            cs = retrieval.chunks(open_source(str(path)).documents, SplitRule(0.2), 400, Stats())
            at = next(c.offset for c in cs if c.split == 0 and c.offset > 0)
            path.write_text(text[:at] + " " + PLANTED + text[at:])


def prepare(src: Path, out: Path, *extra: str) -> None:
    assert prepare_main([str(src), "--out", str(out), "--workers", "1", "--split-chars", "400",
                         "--val-fraction", "0.2", "--tokenizer", "bpe:300", "--index", *extra]) == 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rag")
    write_corpus(root / "src", ["a.txt", "b.txt", "planted.txt"])
    prepare(root / "src", root / "data")
    return root / "src", root / "data"


def all_passages(index: Index) -> list[tuple]:
    return index._db().execute("SELECT document, offset, text FROM passages ORDER BY document, offset").fetchall()


def test_index_holds_only_train_text_and_is_named_by_its_bytes(corpus, tmp_path):
    src, data = corpus
    manifest = json.loads((data / "manifest.json").read_text())
    index = Index.of(data)
    assert (data / manifest["index"]["file"]).name == f"index-{index.sha256[:12]}.sqlite"
    # Every val chunk, cut as prepare cuts it, is absent; every train chunk is present, passage by passage.
    cs = list(retrieval.chunks(open_source(str(src)).documents, SplitRule(0.2), 400, Stats()))
    assert {c.split for c in cs} == {0, 1}
    joined = {}
    for doc, offset, text in all_passages(index):
        joined.setdefault(doc, {})[offset] = text
    for c in cs:
        held = joined[c.document].get(c.offset)
        assert (held is not None and c.text.startswith(held)) == (c.split == 0), c
    # The same inputs build the same bytes.
    again = build_index(data, force=True)
    assert again.entry["sha256"] == index.sha256 and again.up_to_date


def test_index_update_reads_only_new_inputs_and_ranks_as_a_fresh_build(corpus, tmp_path):
    src, data = corpus
    shutil.copytree(src, tmp_path / "src")
    shutil.copytree(data, tmp_path / "data")
    write_corpus(tmp_path / "src", ["c.txt"])
    prepare(tmp_path / "src", tmp_path / "data")
    grown = build_index(tmp_path / "data")  # already updated by prepare --index: nothing to do
    assert grown.up_to_date and grown.entry["inputs"] == 4
    fresh = shutil.copytree(tmp_path / "data", tmp_path / "fresh")
    build_index(fresh, force=True)
    queries = ["loop class method", "decorator attribute iterator", PLANTED]
    assert [[p.document for p in Index.of(tmp_path / "data").search(q, 5)] for q in queries] == \
           [[p.document for p in Index.of(fresh).search(q, 5)] for q in queries]
    # Only the new file was read: the update said so, and a removed file's passages go.
    (tmp_path / "src" / "a.txt").unlink()
    assert prepare_main([str(tmp_path / "src"), "--out", str(tmp_path / "data"), "--workers", "1",
                         "--split-chars", "400", "--val-fraction", "0.2", "--tokenizer", "bpe:300"]) == 0
    shrunk = build_index(tmp_path / "data")
    assert (shrunk.added_inputs, shrunk.removed_inputs) == (0, 1)
    assert not any(d.endswith("a.txt") for d, _, _ in all_passages(Index.of(tmp_path / "data")))
    # The stored word counts that pick a query's words are those of a fresh build, after growing and shrinking.
    fresh = shutil.copytree(tmp_path / "data", tmp_path / "fresh-shrunk")
    build_index(fresh, force=True)
    assert word_counts(Index.of(tmp_path / "data")) == word_counts(Index.of(fresh))


def test_a_grown_corpus_prepared_since_a_parent_manifest_updates_the_parent_index(corpus, tmp_path, capsys):
    """As the retrain flow lays it out: the parent's manifest.json with its index beside it, in another folder
    than the new dataset's. Only the new input is read, and the index ranks as a fresh build."""
    src, data = corpus
    shutil.copytree(src, tmp_path / "src")
    prepare(tmp_path / "src", tmp_path / "data")  # the same source as the grown one: its inputs keep their names
    parent = tmp_path / "parents" / "gptmini-v1"
    parent.mkdir(parents=True)
    shutil.copy(tmp_path / "data" / "manifest.json", parent)
    shutil.copy(Index.of(tmp_path / "data").path, parent)
    write_corpus(tmp_path / "src", ["c.txt"])
    capsys.readouterr()
    prepare(tmp_path / "src", tmp_path / "grown", "--since", str(parent / "manifest.json"))
    assert "from 4 input(s)" in (out := capsys.readouterr().out) and "; read 1 input(s), removed 0" in out
    fresh = shutil.copytree(tmp_path / "grown", tmp_path / "fresh")
    assert build_index(fresh, force=True).added_inputs == 4
    grown, fresh = Index.of(tmp_path / "grown"), Index.of(fresh)
    assert word_counts(grown) == word_counts(fresh) and all_passages(grown) == all_passages(fresh)
    for query in ["loop class method", "decorator attribute iterator", PLANTED]:
        assert [(p.document, p.offset, p.score) for p in grown.search(query, 5)] == \
               [(p.document, p.offset, p.score) for p in fresh.search(query, 5)]


def word_counts(index: Index) -> list[tuple]:
    return index._db().execute("SELECT term, documents FROM terms ORDER BY term").fetchall()


def test_planted_passage_is_retrieved_first_with_its_document_and_offset(corpus):
    src, data = corpus
    [best] = Index.of(data).search("quokka zyzzyva marmoset velvet", 1)
    assert PLANTED[4:] in best.text and best.document.endswith("planted.txt") and best.source == str(src)
    assert (src / "planted.txt").read_text()[best.offset:].startswith(best.text)


def test_a_query_keeps_its_rarest_words_within_the_postings_budget(corpus):
    index = Index.of(corpus[1])
    counts = dict(word_counts(index))
    query = "Decorator attribute quokka_zyzzyva, marmoset! unknownword"
    assert retrieval.words(query) == ["decorator", "attribute", "quokka", "zyzzyva", "marmoset", "unknownword"]
    # The three planted words are in one passage each; the common ones in most passages.
    assert [counts[w] for w in ("quokka", "zyzzyva", "marmoset")] == [1, 1, 1] and counts["decorator"] > 10
    assert index.match(query, max_postings=3) == '"marmoset" OR "quokka" OR "zyzzyva"'
    assert index.match(query, max_postings=2) == '"marmoset" OR "quokka"'
    rarest = min(("decorator", "attribute"), key=lambda w: (counts[w], w))
    assert index.match("decorator attribute", max_postings=1) == f'"{rarest}"'  # one, even over the budget
    assert index.match(query).count(" OR ") == 4 and index.match("unknownword") == ""


def test_an_index_of_the_first_format_counts_words_from_fts5(corpus, tmp_path):
    """A version registered before the `terms` table existed still serves, with the same queries."""
    first = shutil.copyfile(Index.of(corpus[1]).path, tmp_path / "index.sqlite")
    with sqlite3.connect(first) as db:
        db.execute("DROP TABLE terms")
    query = "Decorator attribute quokka zyzzyva marmoset"
    for budget in (2, 50, 10_000):
        assert Index(first).match(query, budget) == Index.of(corpus[1]).match(query, budget)


def test_search_equals_bm25_over_every_match_with_ties_and_exclusion(corpus):
    """The top k are those of ranking every match in one query, the planted passage's document excluded or not:
    the documents repeat 29 words, so BM25 ties abound."""
    index = Index.of(corpus[1])
    db = index._db()
    for query in ["loop class method", "decorator attribute iterator", "quokka python", "zyzzyva"]:
        for k in (1, 5, 50):
            for exclude in (None, index.search(query, 1)[0].document):
                expected = db.execute(
                    "SELECT p.rowid, -bm25(fts) FROM fts JOIN passages p ON p.rowid = fts.rowid WHERE fts MATCH ? "
                    "AND p.document IS NOT ? ORDER BY bm25(fts), p.document, p.offset LIMIT ?",
                    (index.match(query), exclude, k)).fetchall()
                assert [(p.id, p.score) for p in index.search(query, k, exclude)] == \
                       [(f"p{r[0]}", r[1]) for r in expected], (query, k, exclude)


@pytest.fixture(scope="module")
def tiny_bpe(corpus) -> Path:
    """The tiny preset at its random init on the corpus's 300-id BPE: cl100k's 100k-row output would make the
    evaluation's cross-entropy most of this module's time."""
    data = corpus[1]
    tok = get_tokenizer(json.loads((data / "manifest.json").read_text())["tokenizer"], data)
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", vocab_size=padded_vocab_size(tok.n_vocab), tokenizer=tok.name))
    return save_pretrained(model, data.parent / "tiny-bpe", tokenizer_file=data / "tokenizer.tiktoken")


@pytest.fixture(scope="module")
def tiny(tiny_bpe):
    return load_model(tiny_bpe)


def test_greedy_generation_with_retrieval_equals_the_passage_prepended_by_hand(corpus, tiny):
    model, tok = tiny
    index = Index.of(corpus[1])
    prompt = "quokka zyzzyva marmoset"
    text, cited = rag.generate_text(model, tok, index, prompt, max_new_tokens=12, temperature=0)
    [passage] = index.search(prompt, 1)
    assert [p.id for p in cited] == [passage.id]
    # The passage, cut at its end to leave room in the 128 positions for the prompt and the 12 new tokens.
    prompt_ids = [tok.eot_token] + tok.encode(prompt)
    by_hand = [tok.eot_token] + tok.encode(passage.text)[:128 - 12 - len(prompt_ids) - 1] + prompt_ids
    assert len(by_hand) == 128 - 12
    assert rag.retrieve(index, tok, prompt_ids, 128 - 12, rag.RagOptions())[0] == by_hand
    out = generate(model, [by_hand], 12, temperature=0, eos_token_id=tok.eot_token,
                   allowed=sampling_mask(tok, model.config.vocab_size, torch.device("cpu")))[0]
    assert text == tok.decode([t for t in out[len(by_hand):] if t != tok.eot_token])


def test_retrieval_again_every_stride_tokens_rebuilds_the_context(corpus, tiny):
    model, tok = tiny
    index = Index.of(corpus[1])
    contexts = []

    def complete(context, n):
        contexts.append(context)
        return [tok.encode(" velvet")[0]] * n

    prompt = [tok.eot_token] + tok.encode("decorator attribute")
    result = rag.generate(index, tok, prompt, 12, complete, 128, rag.RagOptions(k=2, stride=4))
    assert [len(c) <= 128 - 4 for c in contexts] == [True, True, True]
    assert contexts[1][-5:] == contexts[0][-1:] + [tok.encode(" velvet")[0]] * 4  # the prefix grew by 4
    assert len(result.ids) == 12 and len(result.citations) >= 2


def test_eval_segments_filter_the_own_document_and_match_the_random_passage_length(corpus, tiny):
    model, tok = tiny
    src, data = corpus
    index, val = Index.of(data), retrieval.read_val(data)
    segs = rag.segments(tok, index, val, 128, 32, rag.RagOptions())
    docs = {p.id: p.document for p in (index.search(w, 50) for w in WORDS) for p in p}
    assert len({len(segs[m]) for m in rag.MODES}) == 1
    for none, everything, filtered, rand in zip(*(segs[m] for m in rag.MODES)):
        assert none.targets == everything.targets == filtered.targets == rand.targets
        assert len(rand.context) == len(everything.context) >= len(none.context)
    # `filtered` never reads the val piece's own document; `all` does here (the documents repeat their words).
    own = [[val[s.piece][0] in s.documents for s in segs[m]] for m in ("all", "filtered")]
    assert any(own[0]) and not any(own[1])
    assert docs


def test_eval_rag_prints_the_four_figures(corpus, tiny_bpe, capsys):
    from gptmini.cli.eval import main as eval_main

    assert eval_main(["--checkpoint", str(tiny_bpe), "--data-dir", str(corpus[1]), "--rag",
                      "--rag-eval-stride", "64"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    for mode in ("all", "filtered", "random"):
        assert set(result[mode]) >= {"val_bpb", "difference", "standard_error"}
    assert result["recall"]["queries"] > 0 and 0 <= result["recall"]["recall@1"] <= 1
    assert "retrieval, own document excluded" in out


@pytest.mark.parametrize("flags, message", [
    (["--rag-k", "0"], "k=0 is out of range; use 1 to 50"),
    (["--rag-k", "51"], "k=51 is out of range; use 1 to 50"),
    (["--rag-stride", "0"], "stride=0 is out of range"),
])
def test_generate_rag_bad_options_exit_2_naming_the_limit(corpus, tiny_bpe, flags, message, capsys):
    from gptmini.cli.generate import main as generate_main

    assert generate_main(["--checkpoint", str(tiny_bpe), "--rag", "--index", str(corpus[1]), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_vector_store_search_and_a_cited_completion_through_the_openai_client(corpus, tiny, tiny_bpe, tmp_path):
    src, data = corpus
    server = Server("--checkpoint", str(tiny_bpe), "--index", str(data), "--max-tokens", "16", log=tmp_path / "log",
                    timeout=180)  # the shared 2-core VM took 70 s to start a server at a load average of 17
    try:
        client = server.openai()
        [store] = httpx.get(server.url + "/v1/vector_stores", timeout=10).json()["data"]
        page = client.vector_stores.search(store["id"], query="quokka zyzzyva marmoset python", max_num_results=2)
        best = page.data[0]
        assert PLANTED[4:] in best.content[0].text and best.filename.endswith("planted.txt") and best.score > 0
        assert best.attributes["source"] == str(src) and len(page.data) == 2
        prompt = "quokka zyzzyva marmoset"
        reply = client.completions.create(model="gptmini", prompt=prompt, max_tokens=8, temperature=0,
                                          extra_body={"retrieval": {"k": 1}})
        [citation] = reply.choices[0].model_extra["citations"]
        assert citation["id"] == best.file_id and citation["document"] == best.filename
        model, tok = tiny
        text, _ = rag.generate_text(model, tok, Index.of(data), prompt, max_new_tokens=8, temperature=0)
        assert reply.choices[0].text == text  # the same context as `gptmini generate --rag`
        off = client.completions.create(model="gptmini", prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"retrieval": False})
        assert "citations" not in off.choices[0].model_extra
        assert server.metric("gptmini_retrieval_latency_seconds_count", 'endpoint="completions"') == 1
        assert server.metric("gptmini_retrieval_latency_seconds_count", 'endpoint="vector_store_search"') == 1
        # retrieval.stride: the server runs `rag.generate`'s loop, retrieving before every 3 new tokens.
        searches = []

        class Counted:
            def search(self, *args):
                searches.append(args)
                return index.search(*args)

        index = Index.of(data)
        expected = rag.generate(Counted(), tok, [tok.eot_token] + tok.encode(prompt), 8, rag.model_complete(model, tok),
                                model.config.max_seq_len, rag.RagOptions(k=2, stride=3))
        assert len(searches) == 3 and len(expected.ids) == 8
        for stream in (False, True):
            reply = client.completions.create(model="gptmini", prompt=prompt, max_tokens=8, temperature=0,
                                              stream=stream, extra_body={"retrieval": {"k": 2, "stride": 3}})
            chunks = list(reply) if stream else [reply]
            assert "".join(c.choices[0].text for c in chunks) == tok.decode(expected.ids)
            assert chunks[-1].choices[0].finish_reason == "length"
            assert [c["id"] for c in chunks[-1].choices[0].model_extra["citations"]] == \
                   [p.id for p in expected.citations]
        assert server.metric("gptmini_retrieval_latency_seconds_count", 'endpoint="completions"') == 1 + 2 * 3
        # A stop string longer than a stride (the first 4 tokens' text) still stops the choice.
        whole, stop = tok.decode(expected.ids), tok.decode(expected.ids[:4])
        reply = client.completions.create(model="gptmini", prompt=prompt, max_tokens=8, temperature=0, stop=[stop],
                                          extra_body={"retrieval": {"k": 2, "stride": 3}})
        assert (reply.choices[0].text, reply.choices[0].finish_reason) == (whole[:whole.index(stop)], "stop")
        # Chat, with n choices: each runs its own loop, and each cites what it read.
        chat = client.chat.completions.create(model="gptmini", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=6, n=2, temperature=0,
                                              extra_body={"retrieval": {"k": 1, "stride": 2}})
        assert len({c.message.content for c in chat.choices}) == 1  # greedy: the same text twice
        assert all(c.model_extra["citations"] and c.finish_reason for c in chat.choices)
        assert 0 < chat.usage.completion_tokens <= 2 * 6
    finally:
        server.stop()


@pytest.mark.slow
def test_a_promotion_swaps_model_and_index_together(corpus, tiny_bpe, tmp_path, monkeypatch):
    """Each version names its own index; the host following @production loads the pair and swaps both."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    mc = registry.client(uri)
    experiment = mc.create_experiment("rag", artifact_location=(tmp_path / "artifacts").as_uri())
    other = shutil.copytree(corpus[1], tmp_path / "other")
    build_index(other, passage_chars=256)  # another index of the same text
    versions, shas = [], []
    for data in (corpus[1], other, None):
        run = mc.create_run(experiment).info.run_id
        tags = {}
        if data is not None:
            entry = json.loads((data / "manifest.json").read_text())["index"]
            mc.log_artifact(run, str(data / entry["file"]), "retrieval")
            tags, shas = registry.index_tags(run, entry), shas + [entry["sha256"]]
        versions.append(str(registry.log_model_version(mc, run, tiny_bpe, tags).version))
    host = ModelHost(ServeConfig(model_uri="models:/gptmini@production"))
    try:
        for version, sha in zip(versions, [*shas, None]):
            registry.promote(mc, version)
            host.poll()
            served = host.current
            assert served.version == version and (served.index.sha256 if served.index else None) == sha
    finally:
        host.close()

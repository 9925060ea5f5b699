"""bench/static_decode.py (the CUDA-graph decode path) gives gptmini.generate's greedy tokens, on CPU.

On weights where a caching or position bug shows: a trained model (400 steps on the 300-id BPE, 3 s; at 40
steps its greedy text is one repeated token, whatever the cache does), and `sharp_model`'s large weights for
the other layouts. At the 0.02 init a model's output barely depends on its context, and a broken cache would
pass.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptmini.config import model_preset
from gptmini.generate import generate
from gptmini.model import GPTOSSMini
from gptmini.data.loader import TokenShards
from gptmini.weights import load_pretrained
from model_helpers import sharp_model, tiny, trained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # as `python bench/X.py` has it
import static_decode


def static_equals_generate(model: GPTOSSMini, vocab: int, prompt: torch.Tensor | None = None) -> None:
    if prompt is None:
        prompt = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    expected = generate(model, prompt, max_new_tokens=12, temperature=0.0)[:, 9:]
    got = static_decode.StaticDecoder(model, batch=3, max_len=32).generate(prompt, 12)
    assert torch.equal(got, expected)
    assert len({tuple(row.tolist()) for row in got}) == 3  # the rows' contexts tell them apart


def test_static_decoding_equals_model_generate_on_trained_weights(small_shards, tmp_path):
    """Three val prompts of 9 tokens; a cache written one position off changes the tokens that follow."""
    model, _ = load_pretrained(trained(small_shards, tmp_path / "model", 400, 0))
    val = TokenShards.open(small_shards, "val")
    prompt = torch.stack([torch.from_numpy(val[start : start + 9].astype("int64")) for start in (0, 300, 600)])
    static_equals_generate(model.eval(), model.config.vocab_size, prompt)


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 0}, {"n_kv_heads": 1}], ids=["moe-gqa", "dense", "mqa"])
def test_static_decoding_equals_model_generate_token_for_token(overrides):
    static_equals_generate(sharp_model(tiny(vocab_size=512, **overrides)), 512)


def test_static_decoding_refuses_what_it_does_not_support():
    model = GPTOSSMini(model_preset("tiny", vocab_size=512, sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window=8"):
        static_decode.StaticDecoder(model, batch=1, max_len=32)
    decoder = static_decode.StaticDecoder(GPTOSSMini(model_preset("tiny", vocab_size=512)), 1, 16)
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 10)

"""bench/static_decode.py (the CUDA-graph decode path) gives gptmini.generate's greedy tokens, on CPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gptmini.config import model_preset
from gptmini.generate import generate
from gptmini.model import GPTOSSMini

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # as `python bench/X.py` has it
import static_decode


@pytest.mark.parametrize("overrides", [{}, {"num_experts": 0}, {"n_kv_heads": 1}], ids=["moe-gqa", "dense", "mqa"])
def test_static_decoding_equals_model_generate_token_for_token(overrides):
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", vocab_size=512, **overrides)).eval()
    prompt = torch.randint(0, 512, (3, 9))
    expected = generate(model, prompt, max_new_tokens=12, temperature=0.0)[:, 9:]
    got = static_decode.StaticDecoder(model, batch=3, max_len=32).generate(prompt, 12)
    assert torch.equal(got, expected)


def test_static_decoding_refuses_what_it_does_not_support():
    model = GPTOSSMini(model_preset("tiny", vocab_size=512, sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window=8"):
        static_decode.StaticDecoder(model, batch=1, max_len=32)
    decoder = static_decode.StaticDecoder(GPTOSSMini(model_preset("tiny", vocab_size=512)), 1, 16)
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        decoder.generate(torch.zeros(1, 10, dtype=torch.long), 10)

"""Small models for the model/generation/HF tests (kept apart from conftest.py, which other suites own)."""
from __future__ import annotations

import pytest
import torch

from gptmini.model import GPTOSSMini, ModelConfig

SEED_CONFIG = {
    "vocab_size": 50304,
    "d_model": 768,
    "n_layers": 12,
    "n_heads": 12,
    "n_kv_heads": 3,
    "d_ff": 3072,
    "num_experts": 8,
    "top_k": 2,
    "max_seq_len": 2048,
    "dropout": 0.1,
}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **{"vocab_size": 256, **overrides})


def sharp_model(config: ModelConfig, seed: int = 0, std: float = 0.2) -> GPTOSSMini:
    """A model whose weights are large enough that attention is far from uniform and routing far from even.

    With the 0.02 training init a random model's output barely depends on positions or context, so tests of
    caching, masking and parity would pass even on broken code; these weights make every mistake show.
    """
    torch.manual_seed(seed)
    model = GPTOSSMini(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads cost far more than they give
    (20 greedy tokens: 0.08 s on one thread, up to 4 s on two under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

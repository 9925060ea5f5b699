"""Small models for the model, generation and HF tests: configs and weights that make mistakes show."""
from __future__ import annotations

import torch

from gptmini.config import model_preset
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
    return model_preset("tiny", **{"vocab_size": 256, **overrides})


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


"""Small models for the model, generation, gate and HF tests: configs and weights that make mistakes show."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gptmini.config import model_preset
from gptmini.data.loader import SlidingWindowDataset, TokenShards
from gptmini.loss import balance_loss, next_token
from gptmini.model import GPTOSSMini, ModelConfig
from gptmini.tokenizer import get_tokenizer
from gptmini.weights import save_pretrained

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



def trained(data_dir: Path, out: Path, steps: int, seed: int, **overrides) -> Path:
    """The tiny preset after `steps` AdamW steps on the train split of `data_dir`, init and batch order drawn
    from `seed`, saved with its tokenizer to `out`. 40 steps on the 300-id BPE shards take about a second and
    give a model whose next token depends on its context."""
    torch.manual_seed(seed)
    manifest = TokenShards.open(data_dir, "train").manifest
    vocab = {"vocab_size": manifest["vocab_size"], "tokenizer": manifest["tokenizer"]}
    model = GPTOSSMini(model_preset("tiny", **vocab, **overrides))
    windows = SlidingWindowDataset(TokenShards.open(data_dir, "train"), 32, 32)
    order = np.random.default_rng(seed).permutation(len(windows))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(steps):
        x, y = windows.batch(order[step * 8 : step * 8 + 8])
        loss = next_token(model, x, y) + balance_loss(model)  # as the trainer scores a step
        loss.backward()
        opt.step()
        opt.zero_grad()
    return save_pretrained(model, out, tokenizer_file=get_tokenizer(vocab["tokenizer"], data_dir).file)

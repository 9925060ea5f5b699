"""gptmini: a small modern GPT, from raw text to a registered model.

The Python API is the names below (docs/python-api.md), imported on first use: `import gptmini` stays
light, so `gptmini prepare` never loads the model and the layers of docs/ARCHITECTURE.md hold.

    from gptmini import GPTOSSMini, GPTTrainer
    model = GPTOSSMini(**config)                      # the seed's config dict, or a ModelConfig
    trainer = GPTTrainer(model, tokenizer, train_data)
    trainer.train(train_loader, val_loader)           # or trainer.train(steps=...) on train_data
    generated = model.generate(input_ids, max_new_tokens=50)
    model, tokenizer = GPTOSSMini.from_pretrained("models:/gptmini@production")
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name and the module that defines it: the one list of what `from gptmini import ...` offers.
PUBLIC = {
    "GPTOSSMini": "gptmini.api",  # the model, with generate() and from_pretrained()
    "GPTTrainer": "gptmini.api",  # `gptmini train`'s recipe in this process, with live curves in Jupyter
    "ModelConfig": "gptmini.model",
    "get_tokenizer": "gptmini.tokenizer",  # get_tokenizer("cl100k_base"), or a trained bpe:N by name and folder
    "SlidingWindowDataset": "gptmini.data.loader",  # (x, y) windows of a token stream, every `stride` tokens
}
__all__ = [*PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'gptmini' has no attribute {name!r}; the public names are {', '.join(PUBLIC)}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

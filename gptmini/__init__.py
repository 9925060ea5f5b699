"""gptmini: a small modern GPT, from raw text to a registered model."""
from gptmini.tokenizer import get_tokenizer

__version__ = "0.1.0"

__all__ = ["GPTOSSMini", "ModelConfig", "PRESETS", "get_tokenizer", "__version__"]


def __getattr__(name: str):
    # The model imports torch; keep `import gptmini` cheap for the CLI and data workers.
    if name in ("GPTOSSMini", "ModelConfig", "PRESETS"):
        from gptmini import model

        return getattr(model, name)
    raise AttributeError(name)

"""gptmini: a small modern GPT, from raw text to a registered model.

The library's layers, and where each concept lives: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"

"""`gptmini <command> ...`: a table from subcommand to the function that runs it.

Each entry is imported only when its command runs, so `gptmini generate` does not pay for
pyarrow and `gptmini prepare` does not pay for MLflow.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("gptmini.data.prepare:main", "tokenize sources into verified Arrow token shards"),
    "train": ("gptmini.train:main", "train a model (single process, or under torchrun)"),
    "eval": ("gptmini.evaluate:main", "evaluate a checkpoint on the held-out split"),
    "generate": ("gptmini.generate:main", "stream text from a checkpoint or registered model"),
    "export-hf": ("gptmini.hf:main", "export a checkpoint to Hugging Face format (Llama/Mixtral)"),
    "promote": ("gptmini.registry:promote_main", "move a registry alias (e.g. production) to a version"),
    "bench": ("gptmini.bench:main", "GPU/CPU training and decode benchmark (table + JSON)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: gptmini <command> [options]\n\ncommands:\n{rows}\n\nRun `gptmini <command> --help` for a command's options."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"gptmini: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

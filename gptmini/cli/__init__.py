"""`gptmini <command> ...`: a table from subcommand to the module whose `main(argv)` runs it.

The library exposes functions; argparse lives here. Each command's module is imported only when it runs,
so `gptmini prepare` does not pay for torch's model code and `gptmini generate` does not pay for pyarrow.

Exit codes, the same for every command: 0 done, 2 bad input (one line on stderr naming the value and the
fix), 1 a runtime failure.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from gptmini.errors import Failure, UserError

COMMANDS = {
    "prepare": ("gptmini.cli.prepare", "tokenize sources into verified Arrow token shards"),
    "index": ("gptmini.cli.index", "build the retrieval index of a prepared folder's train passages"),
    "train": ("gptmini.cli.train", "train a model (single process, or under torchrun)"),
    "eval": ("gptmini.cli.eval", "evaluate a checkpoint on the held-out split"),
    "generate": ("gptmini.cli.generate", "stream text from a checkpoint or registered model"),
    "export-hf": ("gptmini.cli.export_hf", "export a checkpoint to Hugging Face format (Llama/Mixtral)"),
    "promote": ("gptmini.cli.promote", "move a registry alias (e.g. production) to a version"),
    "launch": ("gptmini.cli.launch", "train across nodes as one Slurm job (sbatch + srun torchrun)"),
    "serve": ("gptmini.cli.serve", "serve a model over an OpenAI-compatible HTTP API, following an alias"),
}


def run(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body with the exit-code contract: a UserError is one line and exit 2, a Failure
    one line and exit 1; anything else is a bug and keeps its traceback."""
    try:
        return int(body() or 0)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Failure as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


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
    return importlib.import_module(COMMANDS[name][0]).main(rest)


if __name__ == "__main__":
    sys.exit(main())

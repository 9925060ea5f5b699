"""`torchrun --nproc-per-node N -m gptmini.train ...`: the trainer's entry point under torchrun, the same
command as `gptmini train` (gptmini.cli.train); the recipe itself is gptmini.trainer."""
from __future__ import annotations

import os
import sys

from gptmini.cli.train import exit_rank, main

if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_rank(code)
    sys.exit(code)

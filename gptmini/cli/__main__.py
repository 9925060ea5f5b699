"""`python -m gptmini.cli COMMAND ...`: the same as the `gptmini` console script."""
import sys

from gptmini.cli import main

sys.exit(main())

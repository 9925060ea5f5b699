"""Where the test suite's time goes: pytest's `--durations=0` lines summed per module.

    make test DURATIONS=0 2>&1 | tee suite.log
    python bench/suite_durations.py suite.log

Prints a Markdown table, longest module first: its setup + call + teardown seconds, its number of tests and its
slowest phase. Seconds are summed over both pytest-xdist workers, so they add up to more than the wall time.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)s (setup|call|teardown)\s+(\S+?\.py)::(\S.*)$")


def per_module(lines: list[str]) -> dict[str, dict]:
    modules: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "tests": set(), "slowest": (0.0, "")})
    for line in lines:
        if not (m := LINE.match(line)):
            continue
        seconds, phase, module, test = float(m[1]), m[2], m[3], m[4]
        entry = modules[module]
        entry["seconds"] += seconds
        entry["tests"].add(test)
        entry["slowest"] = max(entry["slowest"], (seconds, f"{phase} {test}"))
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the output of a pytest run with --durations=0")
    args = parser.parse_args(argv)
    modules = per_module(args.log.read_text(errors="replace").splitlines())
    if not modules:
        print(f"no duration lines in {args.log}: run pytest with --durations=0", file=sys.stderr)
        return 2
    total = sum(m["seconds"] for m in modules.values())
    print("| module | seconds | share | tests | slowest |\n|---|---:|---:|---:|---|")
    for name, m in sorted(modules.items(), key=lambda kv: -kv[1]["seconds"]):
        seconds, what = m["slowest"]
        print(f"| {name} | {m['seconds']:.0f} | {m['seconds'] / total:.0%} | {len(m['tests'])} | "
              f"{seconds:.0f} s {what[:70]} |")
    print(f"| all | {total:.0f} | 100% | {sum(len(m['tests']) for m in modules.values())} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one engine decode step's time goes, with one sequence running: a Batch of --rows-a rows against one of
--rows-b (the server's --max-batch 16 against --max-batch 1), the demo preset at random init, torch profiler.

    .venv/bin/python bench/profile_engine_step.py [--preset demo] [--steps 20] [--threads 1]
"""
from __future__ import annotations

import argparse
from collections import deque

import torch

from gptmini import quantize
from gptmini.config import model_preset
from gptmini.engine import Batch, Sampling, Sequence
from gptmini.model import GPTOSSMini

from common import md_table, profile


def step_profile(model: GPTOSSMini, rows: int, steps: int) -> dict[str, float]:
    """Self CPU microseconds per decode step, by op."""
    batch = Batch(model, rows)
    waiting = deque([Sequence(list(range(1, 20)), Sampling(max_tokens=steps + 10, temperature=0))])
    take = lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))]  # noqa: E731
    for _ in range(5):  # the prefill, then warm decode steps
        batch.step(take)
    prof = profile(lambda: batch.step(take), steps)
    return {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--rows-a", type=int, default=16)
    p.add_argument("--rows-b", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = quantize.apply(GPTOSSMini(model_preset(args.preset)).eval(), "none")  # as gptmini serve loads it
    a, b = step_profile(model, args.rows_a, args.steps), step_profile(model, args.rows_b, args.steps)
    ops = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))[:12]
    rows = [[op, f"{a.get(op, 0):.0f}", f"{b.get(op, 0):.0f}"] for op in ops]
    print(md_table(["op", f"{args.rows_a} rows, us/step", f"{args.rows_b} row(s), us/step"],
                   rows + [["total", f"{sum(a.values()):.0f}", f"{sum(b.values()):.0f}"]]))


if __name__ == "__main__":
    main()

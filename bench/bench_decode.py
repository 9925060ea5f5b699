"""Greedy decode tokens/s of `gptmini.generate` on the demo preset (random weights, decode layout), batch 1 and 8.

    .venv/bin/python bench/bench_decode.py [--preset demo] [--batch 1,8] [--prompt-len 16] [--new-tokens 128]

To compare two versions of the library in one run, point PYTHONPATH at each tree in turn:

    for i in 1 2 3; do for t in /path/to/old .; do PYTHONPATH=$t .venv/bin/python bench/bench_decode.py; done; done
"""
from __future__ import annotations

import argparse
import time

import torch

import gptmini
from gptmini.config import model_preset
from gptmini.generate import generate
from gptmini.model import GPTOSSMini


def tokens_per_s(model: GPTOSSMini, batch: int, prompt_len: int, new: int) -> float:
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    generate(model, x, 4, temperature=0)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, x, new, temperature=0)
    elapsed = time.perf_counter() - t0
    assert out.shape == (batch, prompt_len + new)
    return batch * new / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset(args.preset)).eval().decode_layout()
    rates = {b: tokens_per_s(model, b, args.prompt_len, args.new_tokens) for b in map(int, args.batch.split(","))}
    print(gptmini.__file__, "  ".join(f"b{b} {r:.1f} tok/s" for b, r in rates.items()), flush=True)


if __name__ == "__main__":
    main()

"""CPU benchmark for the model: training-step tokens/s of the `demo` preset, and greedy generation tokens/s
with and without the KV cache.

    .venv/bin/python bench/bench_model.py [--batch 8] [--seq-len 256] [--new-tokens 256] [--json out.json]
    .venv/bin/python bench/bench_model.py --decode-only [--gen-batch 1,8] [--new-tokens 128]

Generation is greedy, from a prompt of --prompt-len random tokens. At batch 1 both paths pay the same
memory-bound read of the 100352 x 256 output matrix every step, which caps the cache's gain; larger
batches amortise that read and show the cache's real effect. Generation extends the demo config to
max_seq_len=512 so prompt + 256 new tokens fit; that changes no weight (RoPE has no position table), only
the length check. The training step is the trainer's own (bench/common.py's `train_step`).

`--decode-only` times the cached path alone, on weights laid out for decoding (`decode_layout`), and imports
only the model and `gptmini.generate`, so it runs against another version of the library too: point
PYTHONPATH at each tree in turn to compare two in one run (it prints which one ran):

    for i in 1 2 3; do for t in /path/to/old .; do PYTHONPATH=$t .venv/bin/python bench/bench_model.py --decode-only; done; done
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import gptmini
from gptmini.config import model_preset
from gptmini.files import write_json
from gptmini.generate import generate
from gptmini.model import GPTOSSMini


def train_tokens_per_s(model: GPTOSSMini, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    from common import median_seconds, train_step  # the trainer: not imported by --decode-only

    step = train_step(model.train(), torch.device("cpu"))
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
    return batch * seq_len / median_seconds(lambda: step(x[:, :-1], x[:, 1:]).item(), repeats=steps, warmup=warmup)


def generate_tokens_per_s(model: GPTOSSMini, batch: int, prompt_len: int, new: int, use_cache: bool = True) -> float:
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len))
    generate(model, x, 4, temperature=0, use_cache=use_cache)  # warm-up
    t0 = time.perf_counter()
    out = generate(model, x, new, temperature=0, use_cache=use_cache)
    elapsed = time.perf_counter() - t0
    assert out.shape == (batch, prompt_len + new)
    return batch * new / elapsed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 256; 128 with --decode-only)")
    p.add_argument("--gen-batch", default="1,8", help="comma-separated batch sizes for generation")
    p.add_argument("--decode-only", action="store_true",
                   help="only the cached decode, on the decode layout, importing no more of the library than that")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    new = args.new_tokens or (128 if args.decode_only else 256)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = GPTOSSMini(model_preset(args.preset, max_seq_len=max(512, args.prompt_len + new)))
    batches = [int(b) for b in args.gen_batch.split(",")]
    if args.decode_only:
        model.eval().decode_layout()
        rates = {b: generate_tokens_per_s(model, b, args.prompt_len, new) for b in batches}
        print(gptmini.__file__, "  ".join(f"b{b} {r:.1f} tok/s" for b, r in rates.items()), flush=True)
        return
    train = train_tokens_per_s(model, args.batch, args.seq_len, args.steps, args.warmup)
    model.eval()
    result = {"preset": args.preset, "params": model.num_params(), "active_params": model.num_active_params(),
              "train_tokens_per_s": round(train, 1), "train_batch_x_seq": f"{args.batch}x{args.seq_len}"}
    for b in batches:
        cached = generate_tokens_per_s(model, b, args.prompt_len, new)
        full = generate_tokens_per_s(model, b, args.prompt_len, new, use_cache=False)
        result |= {f"generate_b{b}_tokens_per_s_cache": round(cached, 1),
                   f"generate_b{b}_tokens_per_s_no_cache": round(full, 1),
                   f"generate_b{b}_cache_speedup": round(cached / full, 2)}
    result |= {"new_tokens": new, "prompt_len": args.prompt_len}
    print(json.dumps(result, indent=1))
    if args.json:
        from common import environment

        write_json(args.json, result | {"env": environment()})


if __name__ == "__main__":
    main()

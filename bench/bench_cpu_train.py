"""Is bf16 autocast or torch.compile free speed for CPU training? A preset's step (the trainer's own, through
bench/common.py) and evaluation, timed four ways (fp32 or bf16 autocast; eager, or compiled block by block as
`--train.compile true` does) on real batches of a `gptmini prepare` folder.

    python bench/bench_cpu_train.py --data-dir data/python-docs --out bench/results/cpu_train.json

Times are medians over --steps after --warmup untimed steps (the compile happens there; its time is reported
apart), the variants timed a step of each in turn, in one process: compare them as ratios within a run. The
losses are kept, so a variant that trains differently shows.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from gptmini.config import PRESETS, from_preset, model_preset
from gptmini.data.loader import build_loaders
from gptmini.data.prepare import read_manifest
from gptmini.device import autocast, native_bf16
from gptmini.evaluate import evaluate, token_bytes
from gptmini.files import write_json
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer

from common import environment, names, train_step

CPU = torch.device("cpu")
# name: (train.precision, compiled)
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+compile": ("fp32", True),
            "bf16+compile": ("bf16", True)}


class Variant:
    """One way to run the preset's model: its own model, optimizer and loaders, all seeded alike."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, (self.precision, compiled) = name, VARIANTS[name]
        manifest = read_manifest(args.data_dir)
        preset = PRESETS[args.preset]
        torch.manual_seed(0)
        self.model = GPTOSSMini(model_preset(args.preset, tokenizer=manifest["tokenizer"],
                                             vocab_size=manifest["vocab_size"]))
        self.train_step = train_step(self.model, CPU, "blocks" if compiled else "off", precision=self.precision,
                                     cfg=from_preset(args.preset))
        self.step_tokens = preset["data"]["seq_len"] * preset["data"]["batch_size"]
        self.train, self.val = build_loaders(args.data_dir, preset["data"]["seq_len"],
                                             batch_size=preset["data"]["batch_size"], seed=0,
                                             val_seq_len=self.model.config.max_seq_len)
        self.nbytes = token_bytes(get_tokenizer(manifest["tokenizer"], args.data_dir), self.model.config.vocab_size)
        self.losses: list[float] = []
        self.times: list[float] = []
        self.eval_times: list[float] = []
        self.result: dict = {}

    def step(self, timed: bool = True) -> float:
        t = time.perf_counter()
        self.losses.append(self.train_step(*self.train.next_batch()).item())
        elapsed = time.perf_counter() - t
        if timed:
            self.times.append(elapsed)
        return elapsed

    def evaluate(self, max_batches: int) -> None:
        t = time.perf_counter()
        with autocast(CPU, self.precision):
            self.result = evaluate(self.model, self.val, self.nbytes, max_batches=max_batches)
        self.eval_times.append(time.perf_counter() - t)

    def report(self, warmup_s: float, warmup: int) -> dict:
        step_s, eval_s = statistics.median(self.times), statistics.median(self.eval_times)
        return {"variant": self.name, "step_s": step_s, "tokens_per_s": self.step_tokens / step_s,
                "warmup_s": warmup_s, "warmup_steps": warmup, "eval_s": eval_s,
                "eval_tokens": self.result["val_tokens"], "eval_tokens_per_s": self.result["val_tokens"] / eval_s,
                "val_bpb_after": self.result["val_bpb"], "losses": self.losses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="a `gptmini prepare` folder")
    p.add_argument("--preset", default="demo", choices=list(PRESETS), help="its model, batch and optimizer")
    p.add_argument("--variants", default=",".join(VARIANTS), type=names(*VARIANTS), help="comma list")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-batches", type=int, default=4, help="val batches per timed evaluation")
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/cpu_train.json")
    args = p.parse_args(argv)
    env = environment(cpu_capability=torch.backends.cpu.get_cpu_capability(), native_bf16=native_bf16(CPU))
    print(f"# {env}", flush=True)
    variants, warmup_s = [], {}
    for name in args.variants:  # the untimed steps, a compile among them, one variant at a time
        variants.append(Variant(name, args))
        warmup_s[name] = sum(variants[-1].step(timed=False) for _ in range(args.warmup))
    # Timed round-robin, a step of each in turn, so the machine's drift (a shared VM's speed changes by tens of
    # percent over minutes) falls on every variant alike.
    for _ in range(args.steps):
        for v in variants:
            v.step()
    for v in variants:
        v.model.eval()
    for _ in range(args.eval_repeats):
        for v in variants:
            v.evaluate(args.eval_batches)
    results = [v.report(warmup_s[v.name], args.warmup) for v in variants]
    write_json(Path(args.out), {"env": env, "args": vars(args), "results": results})
    for r in results:
        print(f"{r['variant']:>13}: step {r['step_s'] * 1e3:7.1f} ms ({r['tokens_per_s']:6.0f} tok/s), warmup "
              f"{r['warmup_s']:6.1f} s, eval {r['eval_tokens_per_s']:7.0f} tok/s, losses "
              f"{' '.join(f'{v:.3f}' for v in r['losses'][:3])} ... {r['losses'][-1]:.3f}", flush=True)
    base = results[0]
    for r in results[1:]:
        print(f"{r['variant']:>13} / {base['variant']}: step {base['step_s'] / r['step_s']:.2f}x, eval "
              f"{r['eval_tokens_per_s'] / base['eval_tokens_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""cl100k_base against BPE tokenizers trained on the corpus, at equal training wall time.

    python bench/bench_tokenizers.py --budget 150 --out bench/results/tokenizers.json
    python bench/bench_tokenizers.py --runs cl100k_base "cl100k_base --train.precision bf16"   # any train flags

For each tokenizer, through the `gptmini` command line: prepare --source with it, time a short calibration run of
--preset (the model takes the data's vocabulary), then train as many steps as fit in --budget seconds, so every
cosine schedule ends at the budget (data and runs already in --work are reused). Val bits per byte compare across
tokenizers (the val split holds the same text); bytes/s counts the UTF-8 bytes a token covers on average over
the val split. Each run ends with a sample (same prompt, seed and sampling for every tokenizer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gptmini import ending
from gptmini.config import PRESETS
from gptmini.files import write_json

from common import environment

PROMPT = "The Python interpreter"


def gptmini(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gptmini.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"gptmini {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def train_seconds(run_dir: Path, log_every: int, step_tokens: int) -> tuple[float, float]:
    """Seconds spent in training steps (from each logged interval's tokens/s, so evaluation, checkpoints and
    start-up are left out) and the steady tokens/s (the median interval after the first)."""
    rates = [r["tokens_per_s"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    return sum(log_every * step_tokens / r for r in rates), statistics.median_high(rates[1:] or rates)


def bench(spec: str, args: argparse.Namespace, work: Path) -> dict:
    tokenizer, *extra = spec.split()
    tag = tokenizer.replace(":", "")
    label = "-".join([tag, *(a.lstrip("-").replace(".", "_") for a in extra)])
    if args.preset != "demo":  # a run of another preset is another run
        label += f"-{args.preset}"
    data = work / f"data-{tag}"
    prepare_s = None  # None: the folder was prepared by an earlier invocation with the same --work
    if not (data / "manifest.json").exists():
        t = time.perf_counter()
        gptmini("prepare", args.source, "--out", str(data), "--tokenizer", tokenizer)
        prepare_s = time.perf_counter() - t
    manifest = json.loads((data / "manifest.json").read_text())
    preset = PRESETS[args.preset]
    step_tokens = preset["data"]["seq_len"] * preset["data"]["batch_size"]
    quiet = ["--train.eval_every", "100000", "--train.ckpt_every", "100000"]

    run = work / f"run-{label}"
    if ending.read(run) is not None:  # finished in an earlier invocation with the same --work
        wall_s = None
    else:
        cal = work / f"calibrate-{label}"
        gptmini("train", "--preset", args.preset, "--data-dir", str(data), "--out", str(cal), "--steps",
                str(args.calibrate), "--train.log_every", "10", *quiet, *extra)
        _, rate = train_seconds(cal, 10, step_tokens)
        steps = max(1, int(args.budget * rate / step_tokens))
        t = time.perf_counter()
        gptmini("train", "--preset", args.preset, "--data-dir", str(data), "--out", str(run), "--steps", str(steps),
                "--train.log_every", "10", *quiet, *extra)
        wall_s = time.perf_counter() - t
    summary = ending.read(run)
    final = summary["final"]
    seconds, steady = train_seconds(run, 10, step_tokens)
    bytes_per_token = final["val_bytes"] / final["val_tokens"]
    sample = gptmini("generate", "--checkpoint", str(run / "final"), "--prompt", PROMPT, "--max-new-tokens",
                     str(args.sample_tokens), "--temperature", "0.8", "--top-k", "40", "--seed", "0").strip()
    return {"run": spec, "tokenizer": tokenizer, "train_args": extra, "name": manifest["tokenizer"],
            "vocab_size": manifest["vocab_size"],
            "prepare_s": prepare_s, "train_tokens": manifest["splits"]["train"]["tokens"],
            "val_tokens": final["val_tokens"], "val_bytes": final["val_bytes"], "bytes_per_token": bytes_per_token,
            "n_params": summary["n_params"], "steps": summary["steps"], "tokens": summary["tokens"],
            "epochs": summary["tokens"] / manifest["splits"]["train"]["tokens"], "train_s": seconds,
            "run_wall_s": wall_s, "tokens_per_s": summary["tokens"] / seconds, "steady_tokens_per_s": steady,
            "bytes_per_s": summary["tokens"] / seconds * bytes_per_token, "val_bpb": final["val_bpb"],
            "val_loss": final["val_loss"], "sample": sample}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=["cl100k_base", "bpe:8192", "bpe:2048"],
                   help="one per run: a --tokenizer value, then any `gptmini train` flags, in one quoted string")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per tokenizer")
    p.add_argument("--calibrate", type=int, default=30, help="steps of the calibration run")
    p.add_argument("--preset", default="demo", choices=list(PRESETS))
    p.add_argument("--source", default="embedded:python-docs", help="as `gptmini prepare` takes it")
    p.add_argument("--sample-tokens", type=int, default=40)
    p.add_argument("--work", default="runs/bench-tokenizers", help="data and runs go here")
    p.add_argument("--out", default="bench/results/tokenizers.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = []
    for spec in args.runs:
        results.append(bench(spec, args, work))
        r = results[-1]
        print(f"{r['run']:>22}: {r['val_bpb']:.4f} bits/byte | {r['steps']} steps in {r['train_s']:.0f} s | "
              f"{r['tokens_per_s']:.0f} tok/s | {r['bytes_per_s']:.0f} bytes/s | {r['bytes_per_token']:.2f} bytes/token"
              f" | {r['epochs']:.2f} epochs", flush=True)
        print(f"{'':>24}{r['sample']!r}", flush=True)
        write_json(Path(args.out), {"env": env, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed, memory and val loss of fp32, bf16 and int8 weights (gptmini.quantize), with the memory bound.

    .venv/bin/python bench/bench_quantize.py [--preset demo] [--batch 1,16] [--new-tokens 64] [--train-steps 40]
        [--profile] [--device cpu] [--json out.json]

Each (preset, dtype) runs in its own process, so resident memory (VmRSS after decoding, less the process's
RSS before the model was loaded) is that model's alone. The model is the preset at seed 0 trained
--train-steps steps of the trainer's own (bench/common.py) on the embedded corpus (CPython's docs) in the parent process and saved, so that
its val loss means something and quantization error shows in it (with --train-steps 0, the random init is
built in each child); the val loss is over the first --val-batches windows of the val split.

The bound: at batch 1 decode must read every weight it uses once per token, so tokens/s <= copy bandwidth /
bytes read per token (all matmul weights, less the experts a token does not visit, less an untied
embedding table of which it reads one row). Copy bandwidth is a 512 MiB tensor copy (--bandwidth-mib), counted
as bytes read plus bytes written. --profile prints the ops that take a batch-1 decode's time, which explain the
gap.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import multiprocessing
import tempfile
from pathlib import Path

import numpy as np
import torch

from gptmini import quantize
from gptmini.config import Config, model_preset
from gptmini.files import write_json
from gptmini.generate import generate
from gptmini.model import GPTOSSMini
from gptmini.weights import load_model, save_pretrained

from common import Timer, environment, train_step

DTYPES = ("fp32", "bf16", "int8", "fp32-rowmajor")  # the last: fp32 without decode_layout, for comparison


def rss_bytes() -> int:
    """Resident bytes once the C heap has handed back what freed tensors left (glibc keeps it otherwise)."""
    gc.collect()
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def copy_bandwidth(device: str, mib: int = 512) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the roof a memory-bound decode hits."""
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.seconds)
    return 2 * src.numel() / min(times[1:])


def bytes_read_per_token(model: GPTOSSMini) -> int:
    cfg = model.config
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.dim() >= 2)
    per_expert = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dim() == 3:  # stacked experts (E, N, K), or their int8 copies
            per_expert += t.numel() * t.element_size() // cfg.num_experts
        elif t.dim() == 2 and t.shape[0] == cfg.num_experts and name.endswith("_scale"):
            per_expert += t.numel() * t.element_size() // cfg.num_experts
    idle = (cfg.num_experts - cfg.top_k) * per_expert if cfg.is_moe else 0
    element = 1 if quantize.is_quantized(model) else model.norm.weight.element_size()
    table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model * element
    return total - idle - table


def trained_model(preset: str, steps: int, data: Path, seed_len: int) -> GPTOSSMini:
    from gptmini.data.loader import SlidingWindowDataset, TokenShards

    torch.manual_seed(0)
    model = GPTOSSMini(model_preset(preset, max_seq_len=512))
    if steps:
        windows = SlidingWindowDataset(TokenShards.open(data, "train"), seed_len, seed_len)
        cfg = Config()
        cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.0
        step_fn = train_step(model, torch.device("cpu"), cfg=cfg)
        for step in range(steps):
            step_fn(*windows.batch(np.arange(step * 8, step * 8 + 8)))
    return model.eval().requires_grad_(False)


def decode_tokens_per_s(model: GPTOSSMini, batch: int, prompt_len: int, new: int, device: str) -> float:
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    generate(model, x, 4, temperature=0)  # warm-up
    times = []
    for _ in range(2):
        with Timer(device) as t:
            generate(model, x, new, temperature=0)
        times.append(t.seconds)
    return batch * new / min(times)


def profile_decode(model: GPTOSSMini, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    x = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    generate(model, x, 4, temperature=0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, x, 32, temperature=0)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40)


def one(args: argparse.Namespace, preset: str, dtype: str, weights: Path | None, profile: bool) -> dict:
    """One (preset, dtype), in a fresh process of its own: its resident memory is that model's alone."""
    torch.set_num_threads(args.threads)
    base = rss_bytes()
    if weights:
        model = load_model(weights)[0].eval().requires_grad_(False)
    else:
        model = trained_model(preset, 0, None, 0)
    val = None
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(args.device)
    # What `gptmini generate --quantize` runs: int8, or the full-precision weights laid out for decoding.
    if dtype != "fp32-rowmajor":
        model = quantize.apply(model, "int8" if dtype == "int8" else "none")
    loaded = rss_bytes() - base
    if args.data and args.val_batches:
        from gptmini.evaluate import evaluate_split

        from gptmini.tokenizer import get_tokenizer

        val = evaluate_split(model, get_tokenizer(model.config.tokenizer), args.data, seq_len=256, batch_size=4,
                             max_batches=args.val_batches)["val_loss"]
    result = {"preset": preset, "dtype": dtype, "bytes_read_per_token": bytes_read_per_token(model),
              "val_loss": val}
    for b in map(int, args.batch.split(",")):
        result[f"decode_b{b}_tokens_per_s"] = round(decode_tokens_per_s(model, b, 16, args.new_tokens, args.device), 2)
    result["rss_mib"] = round(rss_bytes() / 2**20, 1)
    result["model_rss_mib"] = round(loaded / 2**20, 1)  # loaded (and quantized), before val loss and decoding
    result["model_rss_after_decode_mib"] = round((rss_bytes() - base) / 2**20, 1)
    result["weight_mib"] = round(sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
                                 / 2**20, 1)
    if profile:
        result["profile"] = profile_decode(model, args.device)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", help="comma list of presets")
    p.add_argument("--dtypes", default=",".join(DTYPES[:3]), help=f"comma list from {','.join(DTYPES)}")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--bandwidth-mib", type=int, default=512,
                   help="the copy that measures memory bandwidth, the bound's roof (smaller: a rougher roof)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--data", type=Path, help="prepared shards (default: the embedded corpus, prepared once)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.data is None and args.train_steps:
        from gptmini.data.prepare import PrepareConfig, prepare

        args.data = Path(tempfile.mkdtemp()) / "python-docs"
        prepare(PrepareConfig(sources=["embedded:python-docs"], out=args.data, workers=1))
    bandwidth = copy_bandwidth(args.device, args.bandwidth_mib)
    rows = []
    for preset in args.preset.split(","):
        weights = None
        if args.train_steps:
            weights = Path(tempfile.mkdtemp()) / preset
            save_pretrained(trained_model(preset, args.train_steps, args.data, 64), weights)
        for dtype in args.dtypes.split(","):
            profile = args.profile and preset == "demo" and dtype in ("fp32", "int8", "fp32-rowmajor")
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row = pool.apply(one, (args, preset, dtype, weights, profile))
            row["bound_b1_tokens_per_s"] = round(bandwidth / row["bytes_read_per_token"], 1)
            row["b1_fraction_of_bound"] = round(row["decode_b1_tokens_per_s"] / row["bound_b1_tokens_per_s"], 2)
            profile = row.pop("profile", None)
            print(json.dumps(row), flush=True)
            if profile:
                print(profile, flush=True)
            rows.append(row)
    meta = environment(copy_bandwidth_gb_s=round(bandwidth / 1e9, 2), threads=args.threads)
    print(json.dumps(meta))
    if args.json:
        write_json(args.json, {"rows": rows, **meta})


if __name__ == "__main__":
    main()

"""Decode speed, memory and val loss of fp32, bf16 and int8 weights (gptmini.quantize), against the memory bound,
and what the KV cache buys (fp32-nocache).

    .venv/bin/python bench/bench_quantize.py [--preset demo] [--batch 1,16] [--new-tokens 64] [--train-steps 40]
        [--dtypes fp32,bf16,int8] [--profile] [--device cpu] [--json out.json]

Each (preset, dtype) runs in a process of its own, so its resident memory (VmRSS, less the process's before
loading) is that model's alone. The model is the preset at seed 0 trained --train-steps steps on the embedded
corpus, so that its val loss (over --val-batches windows) shows quantization error; with 0, the random init.
Decode is greedy from a 16-token random prompt, prefill included. `fp32-rowmajor` is fp32 without
`decode_layout`; `fp32-nocache` generates without the KV cache (recomputing the sequence each step, projecting
only the last position). The bound: batch-1 decode reads each weight it uses once per token, so tokens/s <= copy
bandwidth (a --bandwidth-mib copy, read + write) / bytes read per token (the matmul weights, less the experts a
token does not visit and an untied embedding table). --profile prints the ops behind the gap.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
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

from common import environment, ints, names, profile, seconds, train_step

DTYPES = ("fp32", "bf16", "int8", "fp32-rowmajor", "fp32-nocache")


def rss_bytes() -> int:
    """Resident bytes once the C heap has handed back what freed tensors left (glibc keeps it otherwise)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bytes_read_per_token(model: GPTOSSMini) -> int:
    cfg = model.config
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    total = nbytes(t for t in tensors.values() if t.dim() >= 2)
    # Stacked experts (E, N, K), their int8 copies and per-expert scales: a token visits top_k of num_experts.
    experts = nbytes(t for n, t in tensors.items()
                     if t.dim() == 3 or (t.dim() == 2 and t.shape[0] == cfg.num_experts and n.endswith("_scale")))
    idle = experts * (cfg.num_experts - cfg.top_k) // cfg.num_experts if cfg.is_moe else 0
    element = 1 if quantize.is_quantized(model) else model.norm.weight.element_size()
    return total - idle - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model * element)


def decode_tokens_per_s(model: GPTOSSMini, batch: int, new: int, device: str, use_cache: bool = True) -> float:
    """Greedy tokens/s from a 16-token random prompt: batch * new / the faster of two calls, after a warm-up."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    run = lambda n: generate(model, prompt.to(device), n, temperature=0, use_cache=use_cache)  # noqa: E731
    run(4)
    return batch * new / min(seconds(lambda: run(new), device, 2))


def trained_model(preset: str, steps: int = 0, data: Path | None = None, seq_len: int = 64) -> GPTOSSMini:
    from gptmini.data.loader import SlidingWindowDataset, TokenShards

    torch.manual_seed(0)
    model = GPTOSSMini(model_preset(preset, max_seq_len=512))
    if steps:
        windows = SlidingWindowDataset(TokenShards.open(data, "train"), seq_len, seq_len)
        cfg = Config()
        cfg.optim.lr, cfg.optim.weight_decay = 3e-3, 0.0
        step_fn = train_step(model, torch.device("cpu"), cfg=cfg)
        for step in range(steps):
            step_fn(*windows.batch(np.arange(step * 8, step * 8 + 8)))
    return model.eval().requires_grad_(False)


def one(args: argparse.Namespace, preset: str, dtype: str, weights: Path | None) -> dict:
    """One (preset, dtype), in a fresh process of its own: its resident memory is that model's alone."""
    torch.set_num_threads(args.threads)
    base = rss_bytes()
    model = load_model(weights)[0].eval().requires_grad_(False) if weights else trained_model(preset)
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).to(args.device)
    # What `gptmini generate --quantize` runs: int8, or the full-precision weights laid out for decoding.
    if dtype != "fp32-rowmajor":
        model = quantize.apply(model, "int8" if dtype == "int8" else "none")
    loaded = rss_bytes() - base
    val = None
    if args.data and args.val_batches:
        from gptmini.evaluate import evaluate_split
        from gptmini.tokenizer import get_tokenizer

        val = evaluate_split(model, get_tokenizer(model.config.tokenizer), args.data, seq_len=256, batch_size=4,
                             max_batches=args.val_batches)["val_loss"]
    row = {"preset": preset, "dtype": dtype, "bytes_read_per_token": bytes_read_per_token(model), "val_loss": val}
    for b in args.batch:
        row[f"decode_b{b}_tokens_per_s"] = round(decode_tokens_per_s(
            model, b, args.new_tokens, args.device, use_cache=dtype != "fp32-nocache"), 2)
    row |= {"rss_mib": round(rss_bytes() / 2**20, 1),
            "model_rss_mib": round(loaded / 2**20, 1),  # loaded (and quantized), before val loss and decoding
            "model_rss_after_decode_mib": round((rss_bytes() - base) / 2**20, 1),
            "weight_mib": round(nbytes([*model.parameters(), *model.buffers()]) / 2**20, 1)}
    if args.profile and preset == "demo" and dtype in ("fp32", "int8", "fp32-rowmajor"):
        x = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device)
        generate(model, x, 4, temperature=0)
        prof = profile(lambda: generate(model, x, 32, temperature=0))
        row["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10,
                                                   max_name_column_width=40)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo", type=lambda s: s.split(","), help="comma list of presets")
    p.add_argument("--dtypes", default="fp32,bf16,int8", type=names(*DTYPES), help=f"comma list from {DTYPES}")
    p.add_argument("--batch", default="1,16", type=ints)
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
    src = torch.ones(args.bandwidth_mib << 20, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() / min(seconds(lambda: dst.copy_(src), args.device, 6)[1:])  # read + write
    del src, dst
    rows = []
    for preset in args.preset:
        weights = None
        if args.train_steps:
            weights = Path(tempfile.mkdtemp()) / preset
            save_pretrained(trained_model(preset, args.train_steps, args.data), weights)
        for dtype in args.dtypes:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                row = pool.apply(one, (args, preset, dtype, weights))
            row["bound_b1_tokens_per_s"] = round(bandwidth / row["bytes_read_per_token"], 1)
            if "decode_b1_tokens_per_s" in row:
                row["b1_fraction_of_bound"] = round(row["decode_b1_tokens_per_s"] / row["bound_b1_tokens_per_s"], 2)
            prof = row.pop("profile", None)
            print(json.dumps(row), *[prof] if prof else [], sep="\n", flush=True)
            rows.append(row)
    meta = environment(copy_bandwidth_gb_s=round(bandwidth / 1e9, 2), threads=args.threads)
    print(json.dumps(meta))
    if args.json:
        write_json(args.json, {"rows": rows, **meta})


if __name__ == "__main__":
    main()

"""Training tokens/s, MFU and peak memory, decode tokens/s and the loader's share of the step, with a
nanoGPT-style dense baseline timed in the same run (docs/gpu-benchmarks.md: sections, formula, commands).

    python bench/bench_gpu.py --device cuda --out bench/results/h100.json
    python bench/bench_gpu.py --device cpu --preset tiny --seq 64 --batch 4 --steps 5 --baseline match

Every model takes the trainer's own step (bench/common.py) and counts its own FLOPs (`flops_per_token`); MFU's
peak is gptmini.device's table unless --peak-tflops says. It needs neither Prefect nor MLflow.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn as nn

from gptmini.config import model_preset
from gptmini.data.loader import build_loaders
from gptmini.data.prepare import read_manifest
from gptmini.device import DEVICES, PEAK_FLOPS, peak_flops, pick_device
from gptmini.errors import UserError
from gptmini.files import write_json
from gptmini.generate import stream
from gptmini.loss import LossFn, chunked, next_token
from gptmini.model import GPTOSSMini, ModelConfig
from gptmini import parallel

import nanogpt_baseline  # bench/'s own modules: bench/ is on sys.path when this runs as a script
from common import Timer, environment, fmt, ints, md_table, names, profile, train_step
from static_decode import StaticDecoder

PROG = "bench/bench_gpu.py"
DECODE_PATHS = ("cache", "static", "static-graphs")
SECTIONS = ("train", "dense", "baseline", "decode", "loader", "parallel")
FORMULA = ("flops_per_token: each timed model's own (gptmini.model.training_flops: 6 * N_matmul + 12 * L * T * "
           "d_attn); mfu_causal counts 6 * L * T * d_attn, the half a causal flash kernel computes")


@dataclass
class Subject:
    """A model to time: how to build it (it counts its own FLOPs: `flops_per_token(seq_len, causal)`)."""

    name: str
    build: Callable[[], nn.Module]
    vocab_size: int
    loss: LossFn = next_token  # --chunked-loss: gptmini.loss.chunked


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES, help="bf16 on cuda, fp32 on cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "model", "blocks", "off"],
                   help="auto: model on cuda, off on cpu")
    p.add_argument("--preset", default="seed")
    p.add_argument("--vocab-size", type=int, help="override the preset's (100352 for cl100k_base)")
    p.add_argument("--sections", default=",".join(SECTIONS), type=names(*SECTIONS), help="comma list")
    p.add_argument("--seq", default="1024,2048", type=ints, help="training sequence lengths, comma list")
    p.add_argument("--batch", type=ints, help="training batch sizes, comma list, until one runs out of memory "
                   "(default: --tokens-per-step / seq)")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--chunked-loss", action="store_true", help="gptmini models take gptmini.loss.chunked")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--baseline", default="gpt2", choices=["gpt2", "match"],
                   help="gpt2: GPT-2 124M; match: the preset's d_model, layers, heads and vocabulary")
    p.add_argument("--decode-batch", default="1,16", type=ints, help="comma list")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per decode run")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-repeats", type=int, default=3, help="the median is kept")
    p.add_argument("--decode-paths", type=names(*DECODE_PATHS), help="comma list (default: all on cuda, "
                   "cache,static on cpu)")
    p.add_argument("--data-dir", default="bench/gpu_shards", help="the loader section's shards (`make gpu-shards`)")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--out", default="bench-results.json", help="JSON, rewritten after each measurement")
    p.add_argument("--profile", metavar="DIR", help="profile each training config after timing it: DIR/<run>.txt "
                   "and DIR/<run>.trace.json")
    p.add_argument("--profile-trace", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--plan", action="store_true", help="print the FLOP and memory account of --preset, then exit")
    return p.parse_args(argv)


def fail(message: str) -> NoReturn:
    raise SystemExit(f"{PROG}: {message}")


def gptmini_subject(name: str, cfg: ModelConfig, chunked_loss: bool = False) -> Subject:
    return Subject(f"{name}+chunked-ce" if chunked_loss else name, lambda: GPTOSSMini(cfg), cfg.vocab_size,
                   chunked if chunked_loss else next_token)


def degree_one(subject: Subject, layout: str, device: torch.device) -> Subject:
    """`subject` through a parallel code path at degree 1, on a one-rank mesh: `ep1` sends the experts' tokens
    through dispatch and combine (all-to-alls, DTensor expert weights), `tp1` runs the TP plan (DTensor
    projections, sequence-parallel norms, loss_parallel; on an MoE the experts split by tp and the router's
    gradient sums). Beside the plain subject, their cost over it."""

    def build() -> nn.Module:
        model = subject.build()
        mesh = parallel.build_mesh(parallel.MeshDims(), device)
        if layout == "tp1":
            parallel.apply_tp(model, mesh["tp"])
        if layout == "ep1" or (layout == "tp1" and parallel.expert_params(model)):
            parallel.apply_ep(model, mesh[layout[:2]])
        return model

    # The TP plan shards the head over the vocabulary: the loss is loss_parallel's, never the chunked one.
    loss = next_token if layout == "tp1" else subject.loss
    return dataclasses.replace(subject, name=f"{subject.name}+{layout}", build=build, loss=loss)


def plan_text(cfg: ModelConfig, name: str, seqs: list[int], tokens_per_step: int, peak_tflops: float) -> str:
    """The model's FLOPs per token, the tokens/s a given MFU means, and the bytes that scale with the vocabulary
    and the parameter count rather than with FLOPs (logits, optimizer): no GPU needed."""
    with torch.device("meta"):  # the model's own counts, without allocating it
        model = GPTOSSMini(cfg)
    params = model.num_params()
    lines = [f"## {name}: d_model {cfg.d_model}, {cfg.n_layers} layers, heads {cfg.n_heads}/{cfg.n_kv_heads}, "
             f"experts {cfg.num_experts} top-{cfg.top_k}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}",
             f"parameters: {params / 1e6:.1f}M total, {model.num_active_params() / 1e6:.1f}M active per token"]
    for seq in seqs:
        total = model.flops_per_token(seq)
        head = 6 * cfg.d_model * cfg.vocab_size  # the output head's share of the 6N term
        lines += ["", f"seq {seq}: {total / 1e9:.3f} GFLOP per token (train), the output head {head / total:.1%}"]
        lines += [f"MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s = {mfu * peak_tflops * 1e12 / total:,.0f} tokens/s"
                  for mfu in (0.35, 0.42, 0.45, 0.50)]
    logits = tokens_per_step * cfg.vocab_size
    lines += ["", f"at {tokens_per_step} tokens per step:",
              f"- logits: {logits * 2 / 2**30:.1f} GiB bf16, {logits * 4 / 2**30:.1f} GiB per fp32 copy "
              f"(the upcast, log-softmax and its gradient each hold one)",
              f"- AdamW (fused, fp32 master, m, v, grad): {params * 28 / 2**30:.1f} GiB moved per step "
              f"(read p, g, m, v; write p, m, v); weights + grads + moments resident: {params * 16 / 2**30:.1f} GiB",
              f"- gradient clipping: {params * 12 / 2**30:.1f} GiB moved (norm read, then scale read + write)"]
    return "\n".join(lines)


def baseline_subject(kind: str, cfg: ModelConfig, block_size: int, dropout: float) -> Subject:
    if kind == "gpt2":
        bcfg = nanogpt_baseline.BaselineConfig(block_size=block_size, dropout=dropout)
    else:
        bcfg = nanogpt_baseline.BaselineConfig(vocab_size=cfg.vocab_size, block_size=block_size, n_layer=cfg.n_layers,
                                               n_head=cfg.n_heads, n_embd=cfg.d_model, dropout=dropout)
    return Subject(f"nanogpt-{kind}", lambda: nanogpt_baseline.GPT(bcfg), bcfg.vocab_size)


def release(device: torch.device) -> None:
    gc.collect()
    if "torch._dynamo" in sys.modules:  # something compiled: drop its graphs (importing dynamo costs seconds)
        torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def build(subject: Subject, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with device:  # built in place: no CPU init and copy of a large model
        return subject.build()


def measured(run: dict, device: torch.device, measure: Callable[[], dict]) -> dict:
    """`run` with what `measure` returns, or with status "oom" if it ran out of memory."""
    release(device)
    try:
        run |= measure()
    except torch.OutOfMemoryError:
        run["status"] = "oom"
    except RuntimeError as e:  # an OOM inside compilation arrives wrapped (BackendCompilerFailed)
        if "out of memory" not in str(e).lower():
            raise
        run["status"] = "oom"
    release(device)  # outside the except block: its traceback no longer pins the step's tensors
    return run


def time_training(subject: Subject, seq: int, batch: int, args: argparse.Namespace, device: torch.device,
                   peak_tflops: float | None) -> dict:
    model = build(subject, device).train()
    step = train_step(model, device, args.compile, args.grad_accum, loss_fn=subject.loss)
    # Random tokens, never zeros: the same work as real text, and no shortcut through a constant batch.
    tokens = torch.randint(0, subject.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    for _ in range(args.warmup):
        step(x, y)
    with Timer(device) as timer:
        for _ in range(args.steps):
            loss = step(x, y)
    tokens_per_s = batch * seq * args.grad_accum * args.steps / timer.seconds
    flops = model.flops_per_token(seq)
    run = {"tokens_per_s": tokens_per_s, "ms_per_step": timer.seconds / args.steps * 1e3, "flops_per_token": flops,
           "tflops": tokens_per_s * flops / 1e12, "mfu": None, "mfu_causal": None, "peak_mem_gib": peak_gib(device),
           "final_loss": loss.item(), "params_total": sum(p.numel() for p in model.parameters())}
    if peak_tflops:
        run["mfu"] = run["tflops"] / peak_tflops
        run["mfu_causal"] = tokens_per_s * model.flops_per_token(seq, causal=True) / 1e12 / peak_tflops
    if args.profile:  # a few steps more, outside the timed region: the profile to judge each change against
        prof = profile(lambda: step(x, y), args.profile_steps, device)
        stem = Path(args.profile) / f"{subject.name}-T{seq}-B{batch}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        if args.profile_trace:
            prof.export_chrome_trace(str(stem.with_suffix(".trace.json")))
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        stem.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    return run


def bench_training(subject: Subject, seqs: list[int], batches: list[int] | None, args, device, peak_tflops,
                   results: dict, save: Callable[[], None]) -> None:
    """Each seq at each --batch (or --tokens-per-step / seq), until a batch runs out of memory."""
    for seq in seqs:
        for batch in batches or [max(1, args.tokens_per_step // seq)]:
            run = measured({"name": subject.name, "seq_len": seq, "batch_size": batch, "status": "ok",
                            "steps": args.steps, "grad_accum": args.grad_accum}, device,
                           lambda: time_training(subject, seq, batch, args, device, peak_tflops))
            results["train"].append(run)
            save()
            print(f"[bench_gpu] train {run['name']} T={seq} B={batch}: {run['status']} "
                  f"{fmt(run.get('tokens_per_s'), ',.0f')} tok/s, MFU {fmt(run.get('mfu'), '.1%')}",
                  file=sys.stderr, flush=True)
            if run["status"] == "oom":
                break


def time_decode(subject: Subject, path: str, batch: int, args, device, dtype) -> dict:
    """Greedy generation with a KV cache, the prefill (prompt + first token) and the decode loop timed apart:
    tokens/s = batch * (new_tokens - 1) / t_loop. `cache` is gptmini.generate.stream (`gptmini generate`'s path);
    `static` and `static-graphs` are bench/static_decode.py."""
    model = build(subject, device).to(dtype=dtype).eval()
    prompt = torch.randint(0, subject.vocab_size, (batch, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    if path == "cache":
        def prefill_fn(n: int) -> Iterator:
            tokens = stream(model, prompt, max_new_tokens=n, temperature=0.0)
            with torch.inference_mode():
                next(tokens)
            return tokens

        def loop_fn(tokens: Iterator) -> None:
            with torch.inference_mode():
                collections.deque(tokens, maxlen=0)  # drains the generator
    else:
        decoder = StaticDecoder(
            model, batch, args.prompt_len + args.decode_tokens, "reduce-overhead" if path == "static-graphs" else None)
        prefill_fn = lambda n: decoder.prefill(prompt, n)
        loop_fn = lambda state: decoder.decode(*state)

    def generate(n: int) -> tuple[float, float]:
        with Timer(device) as prefill:
            state = prefill_fn(n)
        with Timer(device) as loop:
            loop_fn(state)
        return prefill.seconds, loop.seconds

    generate(min(8, args.decode_tokens))  # warmup: kernels, allocator, compilation and graph capture
    prefill, loop = zip(*(generate(args.decode_tokens) for _ in range(args.decode_repeats)))
    steps = args.decode_tokens - 1
    loop_s = statistics.median(loop)
    return {"tokens_per_s": batch * steps / loop_s, "ms_per_token": loop_s / steps * 1e3,
            "prefill_ms": statistics.median(prefill) * 1e3, "peak_mem_gib": peak_gib(device)}


def time_loader(subject: Subject, seq: int, batch: int, fold: bool, args, device) -> dict:
    """The same step timed on one batch kept on the device and fed from gptmini.data's train loader:
    share_end_to_end = 1 - fixed / with_loader is what the loader costs the step; share_host is the host time
    in next(loader), which on CUDA overlaps queued device work."""
    model = build(subject, device).train()
    step = train_step(model, device, args.compile, loss_fn=subject.loss)
    with warnings.catch_warnings():  # a small corpus may hold no validation window: not needed here
        warnings.simplefilter("ignore")
        train_loader, _ = build_loaders(args.data_dir, seq, batch_size=batch, seed=0, device=device)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = train_loader.next_batch()  # as the trainer takes it: pinned, non-blocking copies on CUDA
        if fold:
            x, y = x.remainder(subject.vocab_size), y.remainder(subject.vocab_size)
        return x, y

    x, y = next_batch()
    for _ in range(args.warmup):
        step(x, y)
    with Timer(device) as fixed:
        for _ in range(args.steps):
            step(x, y)
    host = 0.0
    with Timer(device) as fed:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            x, y = next_batch()
            host += time.perf_counter() - t0
            step(x, y)
    return {"ms_per_step_fixed_batch": fixed.seconds / args.steps * 1e3,
            "ms_per_step_with_loader": fed.seconds / args.steps * 1e3,
            "loader_host_ms_per_step": host / args.steps * 1e3,  # next(loader) and the device copy
            "share_end_to_end": 1 - fixed.seconds / fed.seconds,  # below 0: the difference is within noise
            "share_host": host / fed.seconds}


# Each section's table: (header, key, format); a format right-aligns its column.
COLUMNS = {
    "train": [("model", "name", ""), ("seq", "seq_len", ".0f"), ("batch", "batch_size", ".0f"),
              ("accum", "grad_accum", ".0f"), ("tok/s", "tokens_per_s", ",.0f"), ("ms/step", "ms_per_step", ".1f"),
              ("TFLOP/s", "tflops", ".1f"), ("MFU", "mfu", ".1%"), ("MFU causal", "mfu_causal", ".1%"),
              ("peak GiB", "peak_mem_gib", ".1f"), ("loss", "final_loss", ".3f"), ("status", "status", "")],
    "decode": [("decode", "name", ""), ("path", "path", ""), ("batch", "batch_size", ".0f"),
               ("prompt", "prompt_len", ".0f"), ("new", "new_tokens", ".0f"), ("tok/s", "tokens_per_s", ",.1f"),
               ("ms/token", "ms_per_token", ".2f"), ("prefill ms", "prefill_ms", ".1f"),
               ("peak GiB", "peak_mem_gib", ".2f"), ("status", "status", "")],
    "loader": [("loader", "name", ""), ("seq", "seq_len", ".0f"), ("batch", "batch_size", ".0f"),
               ("ms/step fixed", "ms_per_step_fixed_batch", ".1f"),
               ("ms/step loader", "ms_per_step_with_loader", ".1f"),
               ("loader host ms", "loader_host_ms_per_step", ".2f"),
               ("share (end-to-end)", "share_end_to_end", ".1%"), ("share (host)", "share_host", ".1%"),
               ("source", "source", ""), ("status", "status", "")],
}


def table(results: dict) -> str:
    return "\n\n".join(
        md_table([h for h, _, _ in cols], [[fmt(r.get(k), f) if f else r[k] for _, k, f in cols] for r in results[s]],
                 "".join("r" if f else "l" for _, _, f in cols))
        for s, cols in COLUMNS.items() if results[s])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = pick_device(args.device)
    except UserError as e:
        fail(str(e))
    # What autocast computes in (gptmini.device.autocast); decode runs its weights in it.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.compile = ("model" if device.type == "cuda" else "off") if args.compile == "auto" else args.compile
    sections, seqs, batches = args.sections, args.seq, args.batch
    decode_paths = args.decode_paths or list(DECODE_PATHS if device.type == "cuda" else DECODE_PATHS[:2])
    if args.steps < 1 or args.warmup < 0 or args.decode_tokens < 2 or args.grad_accum < 1:
        fail(f"--steps {args.steps} must be >= 1, --warmup {args.warmup} >= 0, "
             f"--grad-accum {args.grad_accum} >= 1 and --decode-tokens {args.decode_tokens} >= 2")
    try:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        cfg = model_preset(args.preset, dropout=args.dropout, **overrides)
    except ValueError as e:  # an unknown preset (ConfigError) or an invalid override
        fail(f"--preset {args.preset!r}: {e}")
    lengths = seqs + ([args.prompt_len + args.decode_tokens] if "decode" in sections else [])
    if max(lengths) > cfg.max_seq_len:
        fail(f"length {max(lengths)} (--seq, or --prompt-len + --decode-tokens) exceeds the "
             f"{args.preset} preset's max_seq_len {cfg.max_seq_len}; pass smaller values")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norm stats, loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    known_peak = peak_flops(device)
    peak = args.peak_tflops or (known_peak / 1e12 if known_peak else None)  # TFLOP/s
    moe = gptmini_subject(args.preset, cfg, args.chunked_loss)
    # The dense twin: the MoE's active FFN width, so the same FLOPs per token and the MFUs isolate routing's cost.
    dense_cfg = dataclasses.replace(cfg, num_experts=0, top_k=1, d_ff=max(1, cfg.top_k) * cfg.d_ff)
    dense = gptmini_subject(f"{args.preset}-dense", dense_cfg, args.chunked_loss)
    if args.plan:
        plan_peak = peak or PEAK_FLOPS["H100"] / 1e12  # no GPU needed: the H100's figures by default
        print(plan_text(cfg, args.preset, seqs, args.tokens_per_step, plan_peak) + "\n")
        print(plan_text(dense_cfg, f"{args.preset}-dense", seqs, args.tokens_per_step, plan_peak))
        return 0

    meta = environment(device, args=vars(args), device=str(device), dtype=str(dtype).removeprefix("torch."),
                       peak_tflops=peak)
    results = {"meta": meta, "formula": FORMULA, "train": [], "decode": [], "loader": []}
    first_batch = batches[0] if batches else max(1, args.tokens_per_step // seqs[0])

    def save() -> None:
        write_json(args.out, results)

    for section, subject in (("train", moe), ("dense", dense),
                             ("baseline", baseline_subject(args.baseline, cfg, max(seqs), args.dropout))):
        if section in sections:
            bench_training(subject, seqs, batches, args, device, peak, results, save)
    if "decode" in sections:
        for path in decode_paths:
            for b in args.decode_batch:
                run = {"name": args.preset, "path": path, "batch_size": b, "prompt_len": args.prompt_len,
                       "new_tokens": args.decode_tokens, "status": "ok"}
                subject = gptmini_subject(args.preset, cfg)
                results["decode"].append(measured(run, device, lambda: time_decode(subject, path, b, args, device,
                                                                                    dtype)))
                save()
    if "loader" in sections:
        run = {"name": moe.name, "seq_len": seqs[0], "batch_size": first_batch, "source": f"shards {args.data_dir}",
               "status": "ok", "steps": args.steps}
        if not (Path(args.data_dir) / "manifest.json").is_file():
            run["status"] = f"skipped: no shards in {args.data_dir} (`make gpu-shards`, or pass --data-dir)"
        else:
            n_vocab = read_manifest(args.data_dir)["n_vocab"]
            fold = n_vocab > moe.vocab_size  # e.g. cl100k shards into the seed's 50304
            if fold:
                run["source"] += f" (vocab {n_vocab} ids folded into the model's {moe.vocab_size} on device)"
            run = measured(run, device, lambda: time_loader(moe, seqs[0], first_batch, fold, args, device))
        results["loader"].append(run)
    if "parallel" in sections:
        import torch.distributed as dist

        if not dist.is_initialized():  # a one-rank group: what the mesh's collectives run on
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        for subject in (moe, degree_one(moe, "ep1", device), degree_one(moe, "tp1", device), dense,
                        degree_one(dense, "tp1", device)):
            bench_training(subject, seqs[:1], batches, args, device, peak, results, save)
    save()
    print(table(results))
    print(f"\nfull results: {args.out}  (device {meta.get('gpu', device)}, torch {torch.__version__}, "
          f"dtype {meta['dtype']}, compile {args.compile}, peak {peak or 'n/a'} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

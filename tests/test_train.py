"""End to end on CPU: real `gptmini.train` processes, real torchrun with gloo, the embedded corpus.

conftest's reference runs (train_helpers' recipe) are computed once per session and compared against: 1 process
with 2x accumulation, 2-rank DDP and 2-rank FSDP all see the same 4 windows per step, so their weights agree.
Resuming after a fault is tested in test_faults.py, and resuming at another world size in test_multinode.py.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptmini.checkpoint import list_checkpoints, read_json
from gptmini.weights import load_model
from gptmini.metrics import read_metrics, train_losses
from train_helpers import STEPS, env, run_to_end, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def test_loss_falls_on_the_embedded_corpus(reference_runs):
    for run_dir in reference_runs.values():
        losses = train_losses(read_metrics(run_dir / "metrics.jsonl"))
        assert sorted(losses) == list(range(1, STEPS + 1))
        assert losses[STEPS] < losses[1] - 0.1, losses
        summary = read_json(run_dir / "summary.json")
        assert summary["status"] == "completed" and summary["steps"] == STEPS
        assert summary["final"]["val_loss"] < math.log(384) and 0 < summary["final"]["val_bpb"] < 12.0 / math.log(2)
        assert (run_dir / "plots" / "loss.png").stat().st_size > 0 and (run_dir / "plots" / "lr.png").is_file()
        assert (run_dir / "config.toml").is_file()


def test_ddp_on_2_ranks_equals_one_process_with_2x_accumulation(reference_runs):
    a, b = weights(reference_runs["ddp"]), weights(reference_runs["1p"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_on_2_ranks_matches_ddp(reference_runs):
    a, b = weights(reference_runs["fsdp"]), weights(reference_runs["ddp"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la = train_losses(read_metrics(reference_runs["fsdp"] / "metrics.jsonl"))
    lb = train_losses(read_metrics(reference_runs["ddp"] / "metrics.jsonl"))
    assert la == pytest.approx(lb, rel=1e-5)


def test_accumulation_without_sync_under_fsdp_equals_the_big_batch(reference_runs, small_shards, tmp_path):
    """2 ranks x 2 micro-batches of 1 (gradient sync only on the last) == 2 ranks x 1 batch of 2."""
    out = tmp_path / "fsdp-accum"
    run_to_end(train_cmd(small_shards, out, "--parallel", "fsdp", "--batch-size", "1", "--grad-accum", "2", nproc=2))
    a, b = weights(out), weights(reference_runs["ddp"])
    for k in a:
        # Two micro-batches sum their gradients in another order than one batch of 2. Adam divides by
        # sqrt(v), so on embedding rows whose gradients are near zero that rounding grows (measured: about 1e-5
        # on tok_embeddings, under 2e-6 everywhere else); a wrong sync or scale moves weights by ~lr.
        atol = 5e-5 if k == "tok_embeddings.weight" else 1e-5
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol, msg=k)


def test_fsdp_checkpoint_loads_at_another_world_size(reference_runs):
    """Written sharded by 2 ranks, read back whole in this one process."""
    last = list_checkpoints(reference_runs["fsdp"])[-1]
    assert read_json(last / "trainer_state.json")["world_size"] == 2
    model, _ = load_model(last)
    final = weights(reference_runs["fsdp"])
    state = model.state_dict()
    for k in final:
        torch.testing.assert_close(state[k], final[k], rtol=0, atol=0, msg=k)


def test_best_and_final_load_with_load_pretrained(reference_runs, small_shards):
    from gptmini.weights import load_pretrained

    tokenizer = json.loads((small_shards / "manifest.json").read_text())["tokenizer"]
    for sub in ("final", "checkpoints/best"):
        model, tok = load_pretrained(reference_runs["ddp"] / sub)
        assert model.config.n_layers == 2 and tok.name == tokenizer and tokenizer.startswith("bpe-300-")


def test_gptmini_eval_of_a_run_repeats_the_trainers_final_evaluation(reference_runs, tmp_path):
    """One evaluation under one set of names: the 2-rank trainer's last one and `gptmini eval` agree."""
    from gptmini.cli.eval import main

    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(reference_runs["ddp"]), "--json", str(out)]) == 0
    result, final = json.loads(out.read_text()), read_json(reference_runs["ddp"] / "summary.json")["final"]
    assert (result["val_tokens"], result["val_bytes"]) == (final["val_tokens"], final["val_bytes"])
    for name in ("val_loss", "val_bpb", "val_perplexity"):
        assert result[name] == pytest.approx(final[name], rel=1e-5)
    assert result["val_perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_bpb"] == pytest.approx(result["val_loss"] * result["val_tokens"] / result["val_bytes"] / math.log(2))


def test_a_compiled_run_trains_as_the_eager_one(reference_runs, small_shards, tmp_path):
    """`--compile`: each block through torch.compile, traced by dynamo (the eager backend runs the traced graphs
    as they are: seconds on CPU, where Inductor's code generation takes minutes; Inductor itself is tested on
    the MoE kernel in test_moe_kernels.py). The losses are the eager reference run's."""
    out = tmp_path / "compiled"
    cmd = train_cmd(small_shards, out, "--compile", "--train.compile_backend", "eager")
    proc = subprocess.run(cmd, env=env(TORCH_LOGS="dynamo"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torchdynamo start tracing forward" in proc.stderr  # the blocks did go through the compiler
    compiled = train_losses(read_metrics(out / "metrics.jsonl"))
    eager = train_losses(read_metrics(reference_runs["1p"] / "metrics.jsonl"))
    assert sorted(compiled) == sorted(eager)
    assert [compiled[s] for s in sorted(eager)] == pytest.approx([eager[s] for s in sorted(eager)], rel=1e-4)

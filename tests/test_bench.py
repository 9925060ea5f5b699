"""The GPU harness (bench/bench_gpu.py) run on CPU at tiny sizes: it measures, writes its JSON and table,
counts FLOPs as BENCHMARKS.md states, and runs without Prefect or MLflow (as on the GPU machine).

No timing assertions: speed goes in BENCHMARKS.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptmini.config import model_preset
from gptmini.model import GPTOSSMini

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # bench/'s scripts import each other as `python bench/X.py` runs them
import bench_gpu as bench

# A 512-token vocabulary keeps the tiny preset's 100k-row head out of a test's time (and exercises the
# loader's folding of cl100k ids into a smaller model vocabulary).
TINY = ["--device", "cpu", "--preset", "tiny", "--vocab-size", "512", "--seq", "32", "--batch", "2", "--steps", "2", "--warmup", "1",
        "--baseline", "match", "--decode-batch", "1,2", "--decode-tokens", "4", "--prompt-len", "8", "--decode-repeats", "1"]


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    assert bench.main([*TINY, "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_cpu_run_times_every_model_and_decode_and_writes_json(tmp_path, capsys):
    results = run_bench(tmp_path, "--sections", "train,dense,baseline,decode", "--peak-tflops", "0.5",
                        "--profile", str(tmp_path / "prof"), "--profile-steps", "1")
    train = {r["name"]: r for r in results["train"]}
    assert set(train) == {"tiny", "tiny-dense", "nanogpt-match"}
    cfg = model_preset("tiny", vocab_size=512)
    with torch.device("meta"):
        flops = {"tiny": GPTOSSMini(cfg).flops_per_token(32),
                 "tiny-dense": GPTOSSMini(model_preset("tiny", vocab_size=512, num_experts=0, top_k=1,
                                                       d_ff=cfg.top_k * cfg.d_ff)).flops_per_token(32),
                 "nanogpt-match": bench.baseline_subject("match", cfg, 32, 0.0).build().flops_per_token(32)}
    for r in train.values():
        assert r["status"] == "ok" and r["steps"] == 2 and (r["seq_len"], r["batch_size"]) == (32, 2)
        assert r["tokens_per_s"] > 0 and torch.isfinite(torch.tensor(r["final_loss"]))
        assert r["tflops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
        assert r["flops_per_token"] == flops[r["name"]]  # each model's own count
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5)  # achieved over the given peak
        assert r["mfu_causal"] < r["mfu"]  # the causal count halves the attention term
        assert r["peak_mem_gib"] is None  # no CUDA allocator to ask
    # On CPU, auto decode paths are gptmini.generate.stream's KV cache and the static-shape decoder (eager).
    assert [(d["path"], d["batch_size"], d["status"]) for d in results["decode"]] == [
        ("cache", 1, "ok"), ("cache", 2, "ok"), ("static", 1, "ok"), ("static", 2, "ok")]
    assert all(d["tokens_per_s"] > 0 for d in results["decode"])
    assert results["meta"]["device"] == "cpu" and results["meta"]["torch"] == torch.__version__
    table = capsys.readouterr().out
    assert "| tiny | 32 | 2 |" in table and "| nanogpt-match | 32 | 2 |" in table and "| decode |" in table
    # One profile per training config: a trace to open in Perfetto and the top ops as text.
    assert json.loads((tmp_path / "prof" / "tiny-T32-B2.trace.json").read_text())["traceEvents"]
    assert "aten::" in (tmp_path / "prof" / "nanogpt-match-T32-B2.txt").read_text()


def test_the_plan_prints_the_models_own_flop_count(capsys):
    cfg = model_preset("seed", vocab_size=100352)
    assert bench.main(["--plan", "--device", "cpu", "--vocab-size", "100352", "--seq", "1024"]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        flops = GPTOSSMini(cfg).flops_per_token(1024)
    assert "vocab 100352" in out and f"seq 1024: {flops / 1e9:.3f} GFLOP per token" in out


def test_chunked_loss_trains_to_the_same_loss(tmp_path):
    # Same seed, same steps: the chunked cross-entropy (logits never whole) must leave the run unchanged.
    (plain,) = run_bench(tmp_path, "--sections", "train")["train"]
    (chunked,) = run_bench(tmp_path, "--sections", "train", "--chunked-loss")["train"]
    assert chunked["name"] == "tiny+chunked-ce" and chunked["status"] == "ok"
    assert chunked["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)


def test_loader_share_is_measured_on_prepared_shards(tmp_path, small_shards):
    # The 300-id BPE's 384 ids into a 256-id model: the loader folds them on the device.
    results = run_bench(tmp_path, "--sections", "loader", "--data-dir", str(small_shards), "--vocab-size", "256")
    (run,) = results["loader"]
    assert run["status"] == "ok" and run["source"].startswith("shards ")
    assert "folded into the model's 256" in run["source"]
    assert run["ms_per_step_with_loader"] > 0 and run["ms_per_step_fixed_batch"] > 0
    assert run["share_end_to_end"] < 1 and 0 < run["share_host"] < 1  # end-to-end may dip below 0 in noise


def test_bad_input_names_the_value_and_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit, match="exceeds the tiny preset's max_seq_len"):
        bench.main([*TINY, "--seq", "100000", "--out", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--steps 0 must be >= 1"):
        bench.main([*TINY, "--steps", "0", "--out", str(tmp_path / "r.json")])
    for flag, value, message in [("--sections", "train,bogus", "unknown bogus; choose from train,"),
                                 ("--decode-paths", "graphs", "unknown graphs; choose from cache,static,static-graphs"),
                                 ("--batch", "two", "invalid ints value: 'two'"),
                                 ("--seq", "64,0", "'64,0': every value must be a positive integer, e.g. 1,16")]:
        with pytest.raises(SystemExit):
            bench.main([*TINY, flag, value, "--out", str(tmp_path / "r.json")])
        assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_runs_with_prefect_and_mlflow_absent_and_leaves_mfu_na_on_cpu(tmp_path):
    # The H100 machine has neither: block their import and run the command end to end.
    out = tmp_path / "r.json"
    argv = [*TINY, "--sections", "train", "--steps", "1", "--warmup", "0", "--out", str(out)]
    # `python bench/bench_gpu.py ARGS` with both imports blocked: bench/ first on sys.path, run as __main__.
    code = (
        "import runpy, sys; sys.modules['prefect'] = None; sys.modules['mlflow'] = None\n"
        f"sys.path.insert(0, 'bench'); sys.argv = ['bench/bench_gpu.py', *{argv!r}]\n"
        "runpy.run_path('bench/bench_gpu.py', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(out.read_text())["train"]
    assert run["status"] == "ok" and run["tokens_per_s"] > 0
    assert run["mfu"] is None and run["mfu_causal"] is None  # CPU without --peak-tflops: n/a


def test_nanogpt_baseline_counts_the_flops_behind_the_published_mfu():
    # nanoGPT 124M at T=1024: 6 * 123.57M + 12 * 12 * 1024 * 768 = 854.7 MFLOP/token (BENCHMARKS.md's anchor).
    subject = bench.baseline_subject("gpt2", model_preset("seed"), block_size=1024, dropout=0.0)
    with torch.device("meta"):
        assert subject.build().flops_per_token(1024) == 854_654_976


# Each CPU bench runs as the user runs it, in its own processes (`gptmini prepare`, `train` and `generate`), at the
# tiny preset on every fifth topic of the embedded corpus (each run's final evaluation reads all its val windows).
def test_cpu_training_benches_run_end_to_end_on_a_small_bpe(tmp_path):
    """bench_tokenizers (prepare with a trained BPE, calibrate, train to a budget, sample) and bench_cpu_train
    (fp32 and bf16 timed in turn) as BENCHMARKS.md runs them, on the tiny preset and a small corpus."""
    import bench_cpu_train
    import bench_tokenizers
    from pydoc_data import topics

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)[::5]))
    work, out = tmp_path / "work", tmp_path / "tokenizers.json"
    assert bench_tokenizers.main(["--runs", "bpe:300", "--preset", "tiny", "--source", str(corpus), "--budget", "1",
                                  "--calibrate", "10", "--sample-tokens", "5", "--work", str(work),
                                  "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["vocab_size"] == 384 and r["name"].startswith("bpe-300-") and r["steps"] >= 1  # 300 ids padded to 128s
    assert r["n_params"] < 1e6  # the tiny preset's model, not the demo's
    assert r["val_bytes"] > 0 and 0 < r["val_bpb"] < 10 and r["sample"].startswith("The Python interpreter")
    timed = tmp_path / "cpu_train.json"
    assert bench_cpu_train.main(["--data-dir", str(work / "data-bpe300"), "--preset", "tiny", "--variants", "fp32,bf16",
                                 "--steps", "2", "--warmup", "1", "--eval-batches", "1", "--eval-repeats", "1",
                                 "--out", str(timed)]) == 0
    results = json.loads(timed.read_text())["results"]
    assert [v["variant"] for v in results] == ["fp32", "bf16"] and all(v["step_s"] > 0 for v in results)
    for v in results:  # the tiny preset's step (32 x 4 tokens) and one val batch of 4 windows of its 128
        assert v["tokens_per_s"] == pytest.approx(32 * 4 / v["step_s"]) and v["eval_tokens"] == 4 * 128
    assert results[0]["losses"][0] == pytest.approx(results[1]["losses"][0], rel=1e-2)  # same init, same batch


def test_suite_durations_sums_each_modules_phases(tmp_path, capsys):
    import suite_durations

    log = tmp_path / "suite.log"
    log.write_text("=== slowest durations ===\n12.50s setup    tests/test_a.py::test_x\n"
                   "2.00s call     tests/test_a.py::test_x\n30.00s call     tests/test_b.py::test_y[1-2]\n"
                   "0.50s teardown tests/test_a.py::test_z\n")
    assert suite_durations.main([str(log)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith("| tests/test_b.py | 30 | 67% | 1 | 30 s call test_y[1-2]")
    assert rows[3].startswith("| tests/test_a.py | 15 | 33% | 2 | 12 s setup test_x")
    log.write_text("no durations here\n")
    assert suite_durations.main([str(log)]) == 2

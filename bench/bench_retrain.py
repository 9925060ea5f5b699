"""Day two on the demo: continue from production on new text, against training anew on everything.

The embedded corpus is written one topic per file; a held-out share of the topics (--held-out) plays the new
text. v1 trains from scratch on the rest. Then, on everything (prepared `--since` v1's data): `scratch` from a
random init, its full steps; `continue + replay R` from v1 (`--replay R`) and `continue, no replay`, each for
--continue-steps. Each model is measured on the whole val split and on the new and old documents' val pieces;
forgetting is the rise of the old pieces' bits per byte over v1's, and the standard error is that of the paired
per-piece difference against scratch (gptmini.gate.paired). Training runs as `gptmini train` subprocesses, each
with its wall and CPU seconds; a run already completed in --out is measured again, not trained anew.

    OMP_NUM_THREADS=1 python bench/bench_retrain.py --out /tmp/retrain --held-out 0.1 --val-fraction 0.1 --replay 0.25
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from pydoc_data import topics

from gptmini.weights import load_model
from gptmini.config import PRESETS
from gptmini.data.prepare import PrepareConfig, prepare
from gptmini.evaluate import bpb_new_and_old, measures, new_pieces, piece_sums
from gptmini import ending
from gptmini.files import write_json
from gptmini.gate import paired
from gptmini.retrain import continue_steps

from common import environment, fmt, md_table


def write_corpus(root: Path, held_out: float) -> tuple[Path, Path]:
    """old/ and new/: one .txt file per topic; a topic is new when its name's hash falls in the held-out share."""
    old, new = root / "corpus" / "old", root / "corpus" / "new"
    old.mkdir(parents=True, exist_ok=True)
    new.mkdir(exist_ok=True)
    for key, text in topics.topics.items():
        h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
        (new if h < held_out else old).joinpath(f"{key}.txt").write_text(text)
    return old, new


def train(args: list[str], log: Path) -> dict:
    """`gptmini train ARGS`: its wall seconds, its CPU seconds (that child's alone) and the load average at its end."""
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        if subprocess.run([sys.executable, "-m", "gptmini.cli", "train", *args], stdout=f,
                          stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"training failed; see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0, "load_avg_at_end": os.getloadavg(),
            "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}


def measure(run: Path, data: Path, new: torch.Tensor) -> tuple[dict, tuple]:
    model, tokenizer = load_model(run / "checkpoints" / "best" if (run / "checkpoints" / "best").exists() else run)
    nats, nbytes, tokens = piece_sums(model, tokenizer, data)
    return {**measures(nats.sum(), nbytes.sum(), tokens.sum()), **bpb_new_and_old(nats, nbytes, new)}, (nats, nbytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-retrain"))
    ap.add_argument("--held-out", type=float, default=0.05, help="share of the topics that plays the new text")
    ap.add_argument("--replay", type=float, default=0.25)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="from-scratch steps (default: the preset's)")
    ap.add_argument("--continue-steps", type=int, default=None,
                    help="steps of the continued runs (default: a third of the from-scratch steps, the goal's budget)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--json", type=Path, default=Path("bench/results/retrain.json"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    old, new = write_corpus(a.out, a.held_out)
    cache = a.out / "cache"
    d1 = prepare(PrepareConfig([str(old)], a.out / "data-v1", workers=1, cache_dir=cache,
                               val_fraction=a.val_fraction)).manifest
    t0 = time.perf_counter()
    d2 = prepare(PrepareConfig([str(old), str(new)], a.out / "data-v2", workers=1, cache_dir=cache,
                               val_fraction=a.val_fraction, since=a.out / "data-v1"))
    prepare_s = time.perf_counter() - t0
    data = a.out / "data-v2"
    preset = PRESETS[a.preset]
    scratch_steps = a.steps or preset["train"]["steps"]
    tokens_per_step = preset["data"]["batch_size"] * preset["data"]["seq_len"]
    new_train = d2.manifest["since"]["new_tokens"]["train"]
    rule_steps = continue_steps(new_train, tokens_per_step, a.replay, scratch_steps)
    steps = a.continue_steps or scratch_steps // 3
    common = ["--preset", a.preset, "--train.eval_every", "1000000", "--train.ckpt_every", "1000000"]
    runs = {
        "v1 (scratch on old)": (["--data-dir", str(a.out / "data-v1"), "--steps", str(scratch_steps)], None),
        "scratch on all": (["--data-dir", str(data), "--steps", str(scratch_steps)], None),
        f"continue + replay {a.replay}": (["--data-dir", str(data), "--steps", str(steps), "--replay", str(a.replay)],
                                          "v1"),
        "continue, no replay": (["--data-dir", str(data), "--steps", str(steps), "--replay", "0"], "v1"),
    }
    mask = new_pieces(data)
    if not mask.any():
        raise SystemExit(f"the {d2.manifest['since']['new_documents']} held-out documents got no val chunk at "
                         f"--val-fraction {a.val_fraction}: raise --held-out or --val-fraction")
    results, sums = {}, {}
    for i, (name, (args, parent)) in enumerate(runs.items()):
        run = a.out / f"run{i}"
        took = {"wall_s": None, "cpu_s": None, "load_avg_at_end": None}
        if (ending.read(run) or {}).get("status") != ending.COMPLETED:
            extra = ["--init-from", str(a.out / "run0")] if parent else []
            took = train([*common, *args, *extra, "--out", str(run)], a.out / f"run{i}.log")
        m, sums[name] = measure(run, data, mask)
        summary = ending.read(run)
        results[name] = {**took, "train_wall_s": summary["wall_time_s"],
                         "steps": summary["steps"], "tokens": summary["tokens"], **m}
        print(name, json.dumps(results[name]), flush=True)
    base = results["v1 (scratch on old)"]
    ref = "scratch on all"
    for name, r in results.items():
        r["forgetting_bpb"] = r["val_bpb_old"] - base["val_bpb_old"]
        if name != ref:
            c = paired(sums[name][0], sums[ref][0], sums[ref][1])  # difference: scratch - this
            r["vs_scratch"] = {"difference": c.difference, "standard_error": c.standard_error, "pieces": c.pieces}
    out = {**environment(), "preset": a.preset, "held_out": a.held_out, "replay": a.replay, "continue_steps": steps,
           "rule_steps": rule_steps, "val_fraction": a.val_fraction, "new_val_pieces": int(mask.sum()),
           "scratch_steps": scratch_steps, "new_train_tokens": new_train,
           "new_documents": d2.manifest["since"]["new_documents"],
           "old_documents": d1["documents"], "prepare_v2_s": prepare_s, "tokenized_inputs_v2": d2.tokenized_inputs,
           "results": results}
    write_json(a.json, out)
    print("\n" + md_table(
        ["run", "steps", "wall s", "CPU s", "val bpb (all)", "new", "old", "forgetting", "vs scratch (s.e.)"],
        [[name, r["steps"], fmt(r["wall_s"], ".0f"), fmt(r["cpu_s"], ".0f"), fmt(r["val_bpb"], ".4f"),
          fmt(r["val_bpb_new"], ".4f"), fmt(r["val_bpb_old"], ".4f"), fmt(r["forgetting_bpb"], "+.4f"),
          f"{vs['difference']:+.4f} ({vs['standard_error']:.4f})" if (vs := r.get("vs_scratch")) else "-"]
         for name, r in results.items()], "l" * 9))


if __name__ == "__main__":
    main()

"""Day two on the real stack (`make up`: Prefect and MLflow servers, the serving process, the model server):
a production version, new text dropped into the incoming folder, the `retrain` deployment run from a shell.
Only the new files are tokenized, the new version continues from production, learns the new text beyond
noise, is promoted and answered from; a second run with nothing new trains and registers nothing."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptmini import registry

BIN = Path(sys.executable).parent
# A 300-id BPE: trained on day one's corpus, read with again by the continued runs.
TINY = {"preset": "tiny", "max_new_tokens": 4, "prompts": ["def"], "tokenizer": "bpe:300"}


@pytest.fixture(scope="module")
def stack(service_stack):
    up = service_stack.sh("up")
    assert up.returncode == 0, up.stdout + up.stderr
    return service_stack


def follow(stack, deployment: str, **params) -> str:
    run = subprocess.run([str(BIN / "python"), "-m", "flows.follow", deployment, "--params",
                          json.dumps({**TINY, **params}), "--timeout", "500"],
                         env={**stack.env, **stack.client_env}, capture_output=True, text=True, timeout=560,
                         cwd=stack.state)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    return run.stdout


def production(mc):
    return registry.version_by_alias(mc, registry.PRODUCTION, "gptmini")


def new_text(topic: str) -> str:
    # Text no model has seen, regular enough for a tiny model to learn in a few steps.
    return "".join(f"The {topic} valve {i % 7} opens when the {topic} gauge reads {i % 5} bars. "
                   for i in range(400))


@pytest.mark.slow
@pytest.mark.timeout(1500)  # over 60 s: day one, day two and a night with nothing new are three flow runs
def test_retrain_learns_the_incoming_text_from_production_then_skips_when_nothing_is_new(stack, monkeypatch, request):
    env = {**stack.env, **stack.client_env}
    for key, value in stack.client_env.items():  # the MLflow server's credentials, for this process's client
        monkeypatch.setenv(key, value)
    mc = MlflowClient(env["MLFLOW_TRACKING_URI"])
    # Day one: a production version of the tiny preset on the demo corpus, with a 300-id BPE trained on it. In a
    # whole session it is test_flows_stack's deployment run (the same stack group runs it first); alone, this
    # test makes its own.
    base = production(mc)
    if base is None or base.tags.get("preset") != "tiny" or not base.tags.get("tokenizer", "").startswith("bpe-300-"):
        follow(stack, "train-gpt/demo", steps=2, promotion="always")
        base = production(mc)

    incoming = stack.state / "incoming"  # the retrain deployment's folder, made by the serving process
    for topic in ("zorbat", "quillon"):
        (incoming / f"{topic}.txt").write_text(new_text(topic))
    request.addfinalizer(lambda: [p.unlink() for p in incoming.glob("*.txt")])  # the stack is the session's
    out = follow(stack, "train-gpt/retrain", extra_args=["--train.steps", "10"])
    assert "tokenized 2 of 3 input(s)" in out, out[-3000:]  # the demo corpus came from the token cache
    assert re.search(rf"continuing from gptmini v{base.version} on 2 new document\(s\)", out), out[-3000:]
    v2 = mc.get_model_version_by_alias("gptmini", "production")
    assert int(v2.version) == int(base.version) + 1
    tags = v2.tags
    assert (tags["parent_version"], tags["new_documents"], tags["run_steps"]) == (base.version, "2", "10")
    assert int(tags["total_tokens"]) == int(base.tags["total_tokens"]) + int(tags["run_tokens"])
    parts = json.loads(tags["gate.json"])["parts"]
    assert parts["new_difference"] > 2 * parts["new_standard_error"] > 0  # it learned the new text beyond noise
    assert float(tags["val_bpb_new"]) < parts["champion_new"]
    inputs = mc.get_run(v2.run_id).inputs.dataset_inputs
    assert len({d.dataset.digest for d in inputs}) == 2  # its own dataset and its parent's
    ask = stack.sh("ask", "def", timeout=180)
    assert ask.returncode == 0 and f"[gptmini/{v2.version}, finish_reason=" in ask.stdout, ask.stdout + ask.stderr
    listing = subprocess.run([str(BIN / "gptmini"), "promote", "--list"], env=env, capture_output=True, text=True)
    assert re.search(rf"^v{v2.version} .*parent=v{base.version} ", listing.stdout, re.M), listing.stdout

    out = follow(stack, "train-gpt/retrain", extra_args=["--train.steps", "10"])
    assert f"finished Completed: production v{v2.version} already trained on this data" in out, out[-3000:]
    assert len(mc.search_model_versions("name='gptmini'")) == int(v2.version)  # nothing registered

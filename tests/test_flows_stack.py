"""The real local stack (infra/stack.sh): a Prefect server, an MLflow server and the serving process, then
`python -m flows.follow train-gpt/demo` from a plain shell, as `make demo` runs it (with the credentials
`stack.sh env` hands out: conftest's `service_stack` turns authentication on). `stack.sh down` runs when the
session ends, and the session fails if a service outlives it (conftest's pytest_sessionfinish)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import mlflow  # noqa: F401
import prefect  # noqa: F401
from conftest import MODEL_API_KEY, ROOT

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(service_stack):
    """The session's two servers, plus the serving process: everything `make up` starts."""
    up = service_stack.sh("up")
    assert up.returncode == 0, up.stdout + up.stderr
    return service_stack


def pids(state: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in (state / "pids").glob("*.pid")}


@pytest.mark.slow
def test_up_is_idempotent_and_health_checked(stack):
    before = pids(stack.state)
    assert set(before) == {"prefect", "mlflow", "serve", "model"}
    again = stack.sh("up")
    assert again.returncode == 0 and again.stdout.count("already running") == 4
    assert pids(stack.state) == before
    assert stack.sh("status").stdout.count("healthy") == 4
    assert {"prefect.log", "mlflow.log", "serve.log", "model.log"} <= {p.name for p in (stack.state / "logs").iterdir()}


def test_up_registers_the_deployments_with_schedule_and_overridable_parameters(stack):
    """What the serving process registered when `make up` started it: read, never re-applied (the session's
    Prefect server is shared, and the serving process runs what is scheduled)."""
    from datetime import datetime, timedelta, timezone

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.serve import RETRAIN_CRON

    settings = {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.client_env["PREFECT_API_AUTH_STRING"]}
    with temporary_settings(settings), get_client(sync_client=True) as client:
        demo = client.read_deployment_by_name("train-gpt/demo")
        retrain = client.read_deployment_by_name("train-gpt/retrain")
        promote = client.read_deployment_by_name("promote-model/promote")
        assert demo.parameters["preset"] == "demo" and demo.parameters["sources"] == ["embedded:python-docs"]
        assert [s.schedule.cron for s in retrain.schedules] == [RETRAIN_CRON]
        assert retrain.parameters["promotion"] == "if-better"
        assert retrain.parameters["incoming"] == str(stack.state / "incoming")
        assert retrain.global_concurrency_limit.limit == 1  # a retrain that comes due while one runs waits for it
        assert promote.entrypoint == "flows.promote.promote_model"

        # What `prefect deployment run train-gpt/demo --param steps=7` sends, scheduled a day ahead so that the
        # serving process leaves it alone until it is deleted.
        later = datetime.now(timezone.utc) + timedelta(days=1)
        run = run_deployment("train-gpt/demo", parameters={"steps": 7}, scheduled_time=later, timeout=0)
        client.delete_flow_run(run.id)
        assert run.parameters["steps"] == 7 and run.deployment_id == demo.id
        with pytest.raises(Exception, match="steps"):
            run_deployment("train-gpt/demo", parameters={"steps": "many"}, scheduled_time=later, timeout=0)


# Over 60 s: `make demo`'s path, once: a deployment run from a shell, the model server loading the version.
@pytest.mark.slow
def test_deployment_run_from_a_shell_registers_a_version_that_generate_loads(stack):
    state, env = stack.state, {**stack.env, **stack.client_env}
    run = subprocess.run(
        [str(BIN / "python"), "-m", "flows.follow", "train-gpt/demo", "--param", "preset=tiny", "--param", "steps=2",
         "--param", "max_new_tokens=4", "--param", "tokenizer=bpe:300",  # a 3 MB checkpoint, not cl100k's 80 MB
         "--params", '{"prompts": ["def"]}', "--timeout", "400"],
        env=env, capture_output=True, text=True, timeout=450, cwd=state)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The trainer's step lines reach the terminal, prefixed by the time and the task run's name.
    assert re.search(r"^\d\d:\d\d:\d\d train-\S+ +step +2/2 \| loss", run.stdout, re.M), run.stdout[-3000:]
    assert re.search(r"finished Completed", run.stdout), run.stdout[-3000:]
    listing = subprocess.run([str(BIN / "gptmini"), "promote", "--list"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert "production" in listing.stdout and listing.stdout.startswith("v1")
    sample = subprocess.run([str(BIN / "gptmini"), "generate", "--model", "models:/gptmini@production", "--prompt",
                             "def", "--max-new-tokens", "4", "--temperature", "0"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert sample.returncode == 0 and sample.stdout.startswith("def"), sample.stderr
    # The Python API picks the production model up as a notebook would, with its tokenizer.
    load = ("import torch\nfrom gptmini import GPTOSSMini\n"
            "model, tok = GPTOSSMini.from_pretrained('models:/gptmini@production')\n"
            "print(type(model).__name__, tok.name, model.generate(torch.tensor([[0]]), 3).shape)")
    loaded = subprocess.run([str(BIN / "python"), "-c", load], env=env, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert re.fullmatch(r"GPTOSSMini bpe-300-\w+ torch\.Size\(\[1, 4\]\)\n", loaded.stdout), loaded.stdout
    # The model server follows the alias: `stack.sh ask` waits for it to serve v1, then asks it (as `make demo`).
    ask = stack.sh("ask", "def", timeout=180)
    assert ask.returncode == 0, ask.stdout + ask.stderr
    assert "[gptmini/1, finish_reason=" in ask.stdout and "\ndef" in ask.stdout


@pytest.mark.slow
def test_up_passes_the_api_key_to_the_model_server(stack):
    """GPTMINI_API_KEY, set when `make up` runs: the model server asks for it on /v1 and leaves the probes open."""
    assert httpx.get(f"{stack.model_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{stack.model_url}/v1/models", timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.get(f"{stack.model_url}/v1/models", headers=wrong, timeout=10).status_code == 401
    right = {"Authorization": f"Bearer {MODEL_API_KEY}"}
    assert httpx.get(f"{stack.model_url}/v1/models", headers=right, timeout=10).status_code == 200


@pytest.mark.slow
def test_make_demo_exits_non_zero_when_the_flow_run_fails(stack):
    """`make demo` on the running stack with a parameter the flow refuses: the run fails, and so does make."""
    demo = subprocess.run(["make", "--no-print-directory", "demo", "DEMO_PARAMS=--param steps=0"], cwd=ROOT,
                          env={**stack.env, "VENV": str(BIN.parent)}, capture_output=True, text=True, timeout=300)
    assert demo.returncode != 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert re.search(r"finished Failed", demo.stdout), demo.stdout[-3000:]
    assert "train.steps = 0" in demo.stdout + demo.stderr  # the trainer's own check, run by the flow up front
    assert "gptmini promote --list" not in demo.stdout  # nothing after the failed run


@pytest.mark.slow
def test_follow_names_an_unknown_deployment_and_exits_2(stack):
    run = subprocess.run([str(BIN / "python"), "-m", "flows.follow", "train-gpt/no-such"],
                         env={**stack.env, **stack.client_env}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "no deployment 'train-gpt/no-such'" in run.stderr

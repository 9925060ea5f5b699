"""`gptmini serve --model models:/gptmini@production` against a real SQLite MLflow registry: it waits for a
production version, follows the alias when it moves (while a stream runs, and while clients that kept the
first listed model id keep asking), survives a version that fails to load, and rolls back with `gptmini
promote`. And `mlflow models serve` answers from the same version."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import mlflow

from conftest import free_port  # noqa: E402
from gptmini import registry  # noqa: E402
from gptmini.config import model_preset  # noqa: E402
from gptmini.checkpoint import load_model  # noqa: E402
from gptmini.generate import generate_text  # noqa: E402
from gptmini.weights import save_pretrained  # noqa: E402
from model_helpers import sharp_model  # noqa: E402
from serve_helpers import BIN, Server  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite registry and the environment a server or CLI needs to reach it."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mc = registry.client(uri)
    experiment = mc.create_experiment("gptmini", artifact_location=(root / "artifacts").as_uri())
    env = {"MLFLOW_TRACKING_URI": uri, "GPTMINI_CACHE_DIR": str(root / "cache")}
    return mc, experiment, env, root


def register(store, name: str, seed: int, broken: bool = False) -> str:
    """A new version of the tiny preset (2048 positions, so one stream can outlast a swap)."""
    mc, experiment, _, root = store
    folder = root / name
    save_pretrained(sharp_model(model_preset("tiny", max_seq_len=2048), seed=seed), folder)
    if broken:
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    run = mc.create_run(experiment)
    return str(registry.log_model_version(mc, run.info.run_id, folder, {"val_loss": "1.0"}).version)


def served(server: Server) -> str | None:
    r = httpx.get(server.url + "/ready", timeout=5)
    return r.json().get("model") if r.status_code == 200 else None


def test_serve_follows_the_production_alias_without_failing_a_request(store, tmp_path):
    mc, _, env, _ = store
    server = Server("--model", "models:/gptmini@production", "--poll-interval", "0.5", "--max-tokens", "2000",
                    env=env, log=tmp_path / "serve.log", wait_ready=False)
    try:
        # No production version yet: not ready, and /v1 says how to get one.
        assert httpx.get(server.url + "/health").status_code == 200
        reason = lambda: httpx.get(server.url + "/ready").json().get("reason", "")  # noqa: E731
        server.wait_for(lambda: "make demo" in reason(), what="the first look at the alias")
        assert httpx.get(server.url + "/ready").status_code == 503
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "make demo" in r.json()["error"]["message"]

        v1, v2 = register(store, "v1", seed=1), register(store, "v2", seed=2)
        registry.promote(mc, v1)
        server.wait("/ready")
        assert served(server) == "gptmini/1"
        # Clients and chat UIs commonly take the first listed id once and keep it: it is the stable one.
        client = server.openai(max_retries=0)
        listed = [m.id for m in client.models.list().data]
        assert listed[:2] == ["gptmini", "gptmini/1"]
        model = listed[0]
        assert client.completions.create(model=model, prompt="x", max_tokens=1).model == "gptmini/1"

        # A long stream starts on v1; v2 is promoted while it runs; short requests keep coming all along, from
        # openai clients that name the first listed id.
        failures, answered_by, stop = [], set(), threading.Event()

        def keep_asking() -> None:
            asker = server.openai(max_retries=0, timeout=60)
            while not stop.is_set():
                try:
                    answered_by.add(asker.completions.create(model=model, prompt="x", max_tokens=3).model)
                except openai.APIError as exc:
                    failures.append(exc)

        with ThreadPoolExecutor(2) as pool:
            askers = [pool.submit(keep_asking) for _ in range(2)]
            body = {"prompt": "x", "max_tokens": 1000, "stream": True, "ignore_eos": True, "temperature": 0,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
                lines = (ln for ln in stream.iter_lines() if ln)
                first = next(lines)
                registry.promote(mc, v2)
                server.wait_for(lambda: served(server) == "gptmini/2", timeout=20, what="the swap to v2")
                new = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()
                rest = list(lines)
            stop.set()
            for f in askers:
                f.result()
        assert new["model"] == "gptmini/2"
        chunks = [first, *rest]
        assert chunks[-1] == "data: [DONE]"
        events = [json.loads(c[len("data: "):]) for c in chunks[:-1]]
        assert {e["model"] for e in events} == {"gptmini/1"}, "the running stream moved to the new version"
        assert events[-1]["usage"]["completion_tokens"] == 1000
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert failures == []
        assert "gptmini/2" in answered_by and answered_by <= {"gptmini/1", "gptmini/2"}
        assert [m.id for m in client.models.list().data][:2] == ["gptmini", "gptmini/2"]
        assert server.metric("gptmini_model_swaps_total") == 1

        # A version that cannot load leaves v2 serving, with one log line and a metric.
        v3 = register(store, "v3-broken", seed=3, broken=True)
        registry.promote(mc, v3)
        server.wait_for(lambda: server.metric("gptmini_model_load_failures_total", f'version="{v3}"') == 1,
                        what="the failed load to be counted")
        failed = [ln for ln in server.log.read_text().splitlines() if f"gptmini/{v3}" in ln and "failed to load" in ln]
        assert len(failed) == 1 and "still serving gptmini/2" in failed[0], failed
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).json()["model"] == "gptmini/2"

        # Rollback is one `gptmini promote`.
        subprocess.run([str(BIN / "gptmini"), "promote", v1], env={**os.environ, **env}, check=True,
                       capture_output=True)
        server.wait_for(lambda: served(server) == "gptmini/1", timeout=10, what="the rollback to v1")
        # Across both moves the kept id is answered; the version the rollback retired is gone, with a 404
        # that names the id to send instead.
        assert client.completions.create(model=model, prompt="x", max_tokens=1).model == "gptmini/1"
        with pytest.raises(openai.NotFoundError) as gone:
            client.completions.create(model="gptmini/2", prompt="x", max_tokens=1)
        assert "name 'gptmini', which follows models:/gptmini@production (now 'gptmini/1')" in str(gone.value)
    finally:
        server.stop()


def test_mlflow_models_serve_answers_invocations_from_the_production_version(store, tmp_path, monkeypatch):
    mc, _, env, root = store
    monkeypatch.setenv("GPTMINI_CACHE_DIR", env["GPTMINI_CACHE_DIR"])
    if registry.version_by_alias(mc, "production") is None:
        registry.promote(mc, register(store, "v1", seed=1))
    version = registry.version_by_alias(mc, "production").version
    port = free_port()
    log = (tmp_path / "mlflow-serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", "models:/gptmini@production",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            # MLflow runs `uvicorn` from PATH, as in an activated virtualenv.
                            env={**os.environ, **env, "OMP_NUM_THREADS": "1",
                                 "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow-serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "mlflow-serve.log").read_text()
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                       json={"inputs": ["Hello world"], "params": {"max_new_tokens": 8, "temperature": 0.0}})
        assert r.status_code == 200, r.text
        model, tok = load_model(registry.resolve_model_uri(f"models:/gptmini/{version}", env["MLFLOW_TRACKING_URI"]))
        assert r.json()["predictions"] == [generate_text(model, tok, "Hello world", max_new_tokens=8, temperature=0)]
    finally:
        proc.terminate()
        proc.wait(30)


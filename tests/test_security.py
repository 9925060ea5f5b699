"""Secure defaults: loopback-only services, no loader that runs a pickle, no path traversal, and
no credentials in logged params, logs or manifests. (Authentication against real servers is in
test_faults_services.py, whose stack runs with it turned on.)

The malicious pickle creates a marker file when unpickled; every loader is pointed at it in each place a
checkpoint could carry it, and the marker must never appear.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gptmini import checkpoint, config, parallel, weights
from gptmini.data.sources import DataError
from gptmini.loss import cross_entropy
from gptmini.redact import redact

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cret"


class Evil:
    """Unpickling this object runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Evil(marker))


def evil_torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    return buf.getvalue()


# Services bind 127.0.0.1


def test_every_service_binds_127_0_0_1_only():
    stack = (ROOT / "infra" / "stack.sh").read_text()
    assert re.search(r"^HOST=127\.0\.0\.1$", stack, re.M)
    hosts = re.findall(r"--host\s+(\S+)", stack)
    assert hosts and set(hosts) == {'"$HOST"'}, hosts  # prefect and mlflow
    assert 'PREFECT_RUNNER_SERVER_HOST="$HOST"' in stack  # the serving process's health server
    assert "0.0.0.0" not in stack
    compose = (ROOT / "infra" / "docker-compose.yml").read_text()
    published = re.findall(r"ports:\s*\[([^\]]*)\]", compose)
    assert published and all(p.strip().strip('"').startswith("127.0.0.1:") for group in published
                             for p in group.split(",")), published


# No loader runs a pickle


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A genuine training checkpoint (tiny preset, one AdamW step), written by save_checkpoint."""
    from gptmini.model import GPTOSSMini
    from gptmini.optim import build_optimizer

    run = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = config.load(cli={"data": {"data_dir": str(run / "data")}, "train": {"out_dir": str(run)}}, preset="tiny")
    torch.manual_seed(0)
    model = GPTOSSMini(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    loss = cross_entropy(model(torch.randint(0, 1000, (1, 8))), torch.randint(0, 1000, (1, 8)))
    loss.backward()
    opt.step()
    env = parallel.DistEnv(0, 0, 1, torch.device("cpu"))
    state = {"step": 1, "tokens_seen": 8, "best_val_loss": 1e9, "best_step": -1, "wall_time_s": 0.0,
             "sampler": {"epoch": 0, "consumed": 1, "seed": 0, "n": 10, "shuffle": True}}
    return checkpoint.save_checkpoint(run, 1, model, opt, state, {"rng": checkpoint.rng_state()},
                                      config.to_json(cfg), config.to_toml(cfg), env, keep_last=1)


def tampered(real: Path, tmp_path: Path, how: str, marker: Path) -> Path:
    """A copy of the checkpoint with a pickle that would create `marker` put where `how` says."""
    ckpt = tmp_path / "checkpoints" / real.name
    shutil.copytree(real, ckpt)
    dcp_dir = ckpt / "dcp"
    if how == "metadata":  # DCP's .metadata replaced by a plain malicious pickle
        (dcp_dir / ".metadata").write_bytes(evil_pickle(marker))
    elif how == "bytes-entry":  # a genuine-looking .metadata that marks one key as bytes: DCP would torch.load it
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

        payload = evil_torch_save(marker)
        (dcp_dir / "evil.distcp").write_bytes(payload)
        md = _read_metadata(dcp_dir)
        key = next(k for k in md.state_dict_metadata if k.startswith("model."))
        md.state_dict_metadata[key] = BytesStorageMetadata()
        md.storage_data = {k: v for k, v in md.storage_data.items() if k.fqn != key}
        md.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(payload))
        (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    elif how == "tensor-data":  # one tensor's bytes replaced by a torch.save'd malicious object
        payload = evil_torch_save(marker)
        (dcp_dir / "evil.distcp").write_bytes(payload)
        md = _read_metadata(dcp_dir)
        index = next(k for k in md.storage_data if k.fqn.startswith("model."))
        md.storage_data[index] = type(md.storage_data[index])("evil.distcp", 0, len(payload))
        (dcp_dir / ".metadata").write_bytes(pickle.dumps(md))
    return ckpt


def _read_metadata(dcp_dir: Path):
    with open(dcp_dir / ".metadata", "rb") as f:
        return pickle.load(f)  # our own genuine file, in the test


LOADS = ["metadata", "bytes-entry", "tensor-data"]


@pytest.mark.parametrize("how", LOADS)
def test_load_model_never_runs_a_pickle_from_a_checkpoint(how, real_checkpoint, tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tampered(real_checkpoint, tmp_path, how, marker)
    with pytest.raises(Exception):
        weights.load_model(ckpt)
    assert not marker.exists(), f"loading a checkpoint with a malicious {how} ran its code"


def test_gptmini_eval_never_runs_a_pickle(real_checkpoint, tmp_path, capsys):
    from gptmini.cli.eval import main as eval_main

    marker = tmp_path / "PWNED"
    for how in LOADS:
        ckpt = tampered(real_checkpoint, tmp_path / how, how, marker)
        assert eval_main(["--checkpoint", str(ckpt), "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gptmini eval: error:") and "\n" not in err and "Traceback" not in err, err
        assert not marker.exists(), how


def test_trainer_resume_never_runs_a_pickle(real_checkpoint, tmp_path):
    """`gptmini train --resume auto` on a run whose latest checkpoint is tampered with."""
    from gptmini.data.prepare import PrepareConfig, prepare

    data = tmp_path / "data"
    (tmp_path / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    prepare(PrepareConfig(sources=[str(tmp_path / "corpus.txt")], out=data, workers=1, val_fraction=0.0))
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    tampered(real_checkpoint, run, "bytes-entry", marker)
    proc = subprocess.run([sys.executable, "-m", "gptmini.train", "--preset", "tiny", "--data-dir", str(data),
                           "--out", str(run), "--resume", "auto", "--steps", "2", "--batch-size", "1",
                           "--seq-len", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not marker.exists(), proc.stderr[-2000:]
    assert "BytesStorageMetadata" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("place", ["model.safetensors", "pytorch_model.bin"])
def test_load_pretrained_never_runs_a_pickle(place, real_checkpoint, tmp_path):
    """A weights folder whose weights file is a pickle, or with a pickle beside a missing safetensors."""
    from gptmini.cli.export_hf import main as export_main
    from gptmini.cli.generate import main as generate_main
    from gptmini.model import GPTOSSMini
    from gptmini.weights import load_pretrained, save_pretrained

    folder = tmp_path / "final"
    save_pretrained(GPTOSSMini(config.model_preset("tiny")), folder)
    marker = tmp_path / "PWNED"
    if place == "pytorch_model.bin":
        (folder / "model.safetensors").unlink()
    (folder / place).write_bytes(evil_torch_save(marker))
    with pytest.raises((ValueError, FileNotFoundError)):
        load_pretrained(folder)
    assert generate_main(["--checkpoint", str(folder), "--max-new-tokens", "2"]) == 2
    assert export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "hf")]) == 2
    assert not marker.exists() and not (tmp_path / "hf").exists()


# Path traversal


@pytest.mark.parametrize("uri", ["models:/..@production", "models:/../3", "models:/gptmini@../../x",
                                 "models:/.cache@production", "models:/a/../../b@x"])
def test_registry_uris_that_would_leave_the_cache_are_rejected(uri, tmp_path, monkeypatch):
    from gptmini.registry import RegistryError, resolve_model_uri

    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RegistryError, match="models:/NAME@ALIAS"):
        resolve_model_uri(uri, tracking_uri=f"sqlite:///{tmp_path / 'never-created.db'}")
    assert not (tmp_path / "never-created.db").exists()


def test_a_manifest_naming_a_shard_outside_its_folder_is_rejected(tmp_path):
    from gptmini.data.loader import TokenShards
    from gptmini.data.prepare import PrepareConfig, prepare

    (tmp_path / "corpus.txt").write_text("alpha beta gamma delta. " * 200)
    data = tmp_path / "data"
    prepare(PrepareConfig(sources=[str(tmp_path / "corpus.txt")], out=data, workers=1, val_fraction=0.0))
    manifest = json.loads((data / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    outside = tmp_path / "outside.arrow"
    shutil.copy(data / shard["file"], outside)  # a valid shard, size and sha256 matching: only the path is wrong
    shard["file"] = "../outside.arrow"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not a file name inside"):
        TokenShards.open(data, "train")


@pytest.mark.parametrize("spec", ["embedded:../../etc/passwd", "wikipedia:", "ftp://example.com/x.txt"])
def test_source_names_cannot_reach_other_files(spec, tmp_path):
    from gptmini.data.sources import Cache, open_source

    with pytest.raises(DataError):
        open_source(spec, cache=Cache(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*passwd*"))


def test_a_wikipedia_title_stays_in_the_query_string():
    from urllib.parse import parse_qs, urlsplit

    from gptmini.data.sources import wikipedia_url

    url = urlsplit(wikipedia_url("../../../etc/passwd", "https://en.wikipedia.org/w/api.php"))
    assert url.path == "/w/api.php" and parse_qs(url.query)["titles"] == ["../../../etc/passwd"]


def test_mlflow_refuses_artifact_paths_that_leave_the_run(tmp_path):
    import mlflow
    mc = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mc.create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    run = mc.create_run(exp)
    (tmp_path / "f.txt").write_text("x")
    for artifact_path in ("../../escaped", "/abs/escaped"):
        with pytest.raises(Exception):
            mc.log_artifact(run.info.run_id, str(tmp_path / "f.txt"), artifact_path)
    assert not list(tmp_path.rglob("escaped"))


# Credentials never reach params, logs or manifests


@pytest.mark.parametrize("text,shown", [
    (f"https://bob:{SECRET}@example.com/corpus.txt", "https://***@example.com/corpus.txt"),
    (f"https://example.com/c.txt?token={SECRET}&page=2", "https://example.com/c.txt?token=***&page=2"),
    (f"postgresql://gptmini:{SECRET}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    (f"https://s3/x?X-Amz-Signature={SECRET}", "https://s3/x?X-Amz-Signature=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("wikipedia:Python_(programming_language)", "wikipedia:Python_(programming_language)"),
])
def test_redact_masks_credentials_in_urls(text, shown):
    assert redact(text) == shown


class _AuthHandler(BaseHTTPRequestHandler):
    """Serves /corpus.txt only to basic auth bob:SECRET, as a private corpus server would."""

    def do_GET(self):
        expected = "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.send_response(401)
            self.end_headers()
            return
        body = ("Private text about the quick brown fox. " * 300).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def private_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AuthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def test_source_credentials_stay_out_of_the_manifest_and_errors(private_server, tmp_path, capsys):
    from gptmini.cli.prepare import main as prepare_main

    url = f"http://bob:{SECRET}@{private_server}/corpus.txt?token={SECRET}"
    out = tmp_path / "data"
    assert prepare_main([url, "--out", str(out), "--workers", "1", "--cache-dir", str(tmp_path / "c")]) == 0
    manifest = (out / "manifest.json").read_text()
    assert json.loads(manifest)["splits"]["train"]["tokens"] > 0  # the credentials did get it
    assert SECRET not in manifest and "***@" in manifest
    wrong = f"http://bob:wrong-{SECRET}@{private_server}/corpus.txt"
    assert prepare_main([wrong, "--out", str(tmp_path / "d2"), "--workers", "1", "--retries", "0",
                         "--cache-dir", str(tmp_path / "c2")]) == 2  # bad input
    captured = capsys.readouterr()
    assert "401" in captured.err and SECRET not in captured.out + captured.err, captured.err
    assert not (tmp_path / "d2" / "manifest.json").exists()


def test_tracking_params_and_logged_config_hold_no_credentials(tmp_path):
    """The trainer's MLflow params (the resolved config) and config.toml (logged as an artifact)."""
    import mlflow
    from gptmini.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.load(cli={"data": {"sources": [f"https://bob:{SECRET}@example.com/c.txt",
                                                f"https://example.com/d.txt?access_token={SECRET}"]},
                           "tracking": {"tracking_uri": uri, "run_name": "r"}}, preset="tiny")
    with MlflowTracker(uri, cfg, tmp_path / "run") as tracker:
        tracker.log_params(cfg.flat())
    params = mlflow.MlflowClient(uri).get_run(tracker.run_id).data.params
    assert params["data.sources"] and "***" in params["data.sources"]
    assert not [k for k, v in params.items() if SECRET in v]
    assert SECRET not in config.to_toml(cfg)
    saved = config.to_json(cfg)  # train_config.json, in the run folder and in every checkpoint
    assert SECRET not in saved and "***" in saved
    assert config.from_dict(json.loads(saved)).model == cfg.model


"""The MLflow registry on a real SQLite store: versions, aliases, the champion/challenger gate, loading.

Two real tiny models on real shards of the embedded corpus (the 300-id BPE): `worse` (random init) and `better` (trained a
few steps), so the gate's comparison is a real evaluation, not a number we made up.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import mlflow

from gptmini import gate, registry  # noqa: E402
from gptmini.weights import load_model  # noqa: E402
from gptmini.cli.promote import main as promote_main  # noqa: E402
from gptmini.data.loader import SlidingWindowDataset, TokenShards  # noqa: E402
from gptmini.evaluate import evaluate_weights  # noqa: E402
from gptmini.generate import generate_text  # noqa: E402
from gptmini.loss import balance_loss, next_token  # noqa: E402
from gptmini.weights import save_pretrained  # noqa: E402


@pytest.fixture(scope="module")
def weights(small_shards, tmp_path_factory):
    """{'worse': the tiny preset on the 300-id BPE at its random init (seed 0), 'better': that model after 10
    AdamW steps on the train split}: folders of save_pretrained, each carrying its tokenizer."""
    from gptmini.config import model_preset
    from gptmini.data.prepare import read_manifest
    from gptmini.model import GPTOSSMini
    from gptmini.tokenizer import BPE_FILE

    root = tmp_path_factory.mktemp("weights")
    manifest = read_manifest(small_shards)
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", tokenizer=manifest["tokenizer"], vocab_size=manifest["vocab_size"]))
    save_pretrained(model, root / "worse", tokenizer_file=small_shards / BPE_FILE)
    model.train()
    windows = SlidingWindowDataset(TokenShards.open(small_shards, "train"), 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(10):
        x, y = windows.batch(np.arange(step * 4, step * 4 + 4))
        loss = next_token(model, x, y) + balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_pretrained(model, root / "better", tokenizer_file=small_shards / BPE_FILE)
    return {"worse": root / "worse", "better": root / "better"}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory):
    """An MLflow SQLite database with its schema migrated once (the migrations take seconds)."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    registry.client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_db):
    """A fresh SQLite tracking + registry store, and an empty download cache."""
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    mc = registry.client(uri)
    experiment_id = mc.create_experiment("gptmini", artifact_location=(tmp_path / "artifacts").as_uri())
    return mc, experiment_id


def register(store, weights_dir, val_loss=1.0):
    mc, experiment_id = store
    run = mc.create_run(experiment_id)
    tags = {"data_manifest_sha256": "ab" * 32, "val_loss": f"{val_loss:.6f}", "git_commit": "deadbeef"}
    mv = registry.log_model_version(mc, run.info.run_id, weights_dir, tags)
    return run.info.run_id, mc.get_model_version("gptmini", str(mv.version))


def test_version_traces_back_to_its_run_and_data_and_leaves_the_run_open(store, weights):
    mc, _ = store
    run_id, mv = register(store, weights["worse"])
    assert mv.run_id == run_id
    assert {"data_manifest_sha256", "val_loss", "git_commit"} <= set(mv.tags)
    assert str(mc.get_model_version_by_alias("gptmini", "challenger").version) == str(mv.version)
    assert mc.get_run(run_id).info.status == "RUNNING"  # the flow, not the registry, ends the run


def test_pyfunc_model_runs_our_generation_for_any_prompt_length(store, weights):
    _, mv = register(store, weights["better"])
    model = mlflow.pyfunc.load_model(f"models:/gptmini/{mv.version}")
    short, long = "def", "The Python interpreter reads a file and " * 3  # 2 and 85 of the 300-id BPE's tokens
    greedy = {"max_new_tokens": 5, "temperature": 0.0}
    outputs = model.predict([short, long], params=greedy)
    assert len(outputs) == 2 and all(isinstance(o, str) and o for o in outputs)
    # Greedy decoding through the registry equals our own code on the same weights.
    local, tok = load_model(weights["better"])
    assert outputs[1] == generate_text(local, tok, long, **greedy)
    assert len(model.predict([long], params={"max_new_tokens": 40, "temperature": 0.0})[0]) > len(outputs[1])


def test_pyfunc_quantize_param_runs_the_int8_model_of_the_same_version(store, weights):
    from gptmini import quantize

    _, mv = register(store, weights["better"])
    model = mlflow.pyfunc.load_model(f"models:/gptmini/{mv.version}")
    greedy = {"max_new_tokens": 5, "temperature": 0.0}
    local, tok = load_model(weights["better"])
    int8 = model.predict(["The Python interpreter"], params={**greedy, "quantize": "int8"})
    assert int8 == [generate_text(quantize.apply(local, "int8"), tok, "The Python interpreter", **greedy)]


def test_gate_promotes_a_better_version_and_not_a_worse_one(store, weights, small_shards):
    mc, _ = store
    losses = {k: evaluate_weights(w, small_shards)["val_bpb"] for k, w in weights.items()}
    assert losses["better"] < losses["worse"]

    _, v1 = register(store, weights["worse"])
    first = gate.champion_challenger(mc, v1.version, weights["worse"], losses["worse"], small_shards)
    assert first.promote and "no production" in first.reason

    _, v2 = register(store, weights["better"])
    better = gate.champion_challenger(mc, v2.version, weights["better"], losses["better"], small_shards)
    assert better.promote and better.champion_version == str(v1.version)
    assert better.champion_val_bpb == pytest.approx(losses["worse"])

    _, v3 = register(store, weights["worse"])
    worse = gate.champion_challenger(mc, v3.version, weights["worse"], losses["worse"], small_shards)
    assert not worse.promote
    aliases = {k: str(v) for k, v in mc.get_registered_model("gptmini").aliases.items()}
    assert aliases["production"] == aliases["champion"] == str(v2.version)
    assert aliases["challenger"] == str(v3.version)
    assert mc.get_model_version("gptmini", v3.version).tags["gate.decision"] == "rejected"
    assert mc.get_model_version("gptmini", v2.version).tags["gate.decision"] == "promoted"


def test_a_version_is_compared_with_the_champion_on_the_same_validation_tokens(store, weights, small_shards):
    """What `promote-model` with a data_dir asks: a registered version against production, neither loss given."""
    mc, _ = store
    _, champion = register(store, weights["worse"])
    _, challenger = register(store, weights["better"])
    decision = gate.against_champion(mc, challenger.version, weights["better"], small_shards, champion)
    losses = {k: evaluate_weights(w, small_shards)["val_bpb"] for k, w in weights.items()}
    assert decision.promote and decision.champion_version == str(champion.version)
    assert decision.challenger_val_bpb == pytest.approx(losses["better"])
    assert decision.champion_val_bpb == pytest.approx(losses["worse"])


def test_registry_uri_resolves_the_alias_at_each_call(store, weights):
    mc, _ = store
    _, v1 = register(store, weights["worse"])
    _, v2 = register(store, weights["better"])
    registry.promote(mc, v1.version)
    first = registry.resolve_model_uri("models:/gptmini@production")
    assert (first / "model.safetensors").exists() and f"v{v1.version}-" in first.name
    registry.promote(mc, v2.version)
    second = registry.resolve_model_uri("models:/gptmini@production")
    assert f"v{v2.version}-" in second.name
    assert (second / "model.safetensors").read_bytes() == (weights["better"] / "model.safetensors").read_bytes()


def test_promote_cli_moves_production_and_champion(store, weights, capsys):
    mc, _ = store
    _, v1 = register(store, weights["worse"])
    assert promote_main([str(v1.version)]) == 0
    assert "gptmini@production -> v1" in capsys.readouterr().out
    aliases = {k: str(v) for k, v in mc.get_registered_model("gptmini").aliases.items()}
    assert aliases["production"] == aliases["champion"] == str(v1.version)
    assert promote_main(["--list"]) == 0
    assert "production" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["7"], "has no version '7'"),
    (["1", "--alias", "not an alias"], "not a valid alias"),
])
def test_promote_cli_rejects_bad_input_with_one_clear_line(store, weights, capsys, argv, message):
    register(store, weights["worse"])
    assert promote_main(argv) == 2  # bad input, as for every gptmini command
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_promote_cli_with_no_server_answering_is_a_runtime_failure_in_one_line(monkeypatch, capsys):
    """Not the user's input: exit 1, still one line that says what to check."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert promote_main(["--list", "--tracking-uri", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "MLflow at http://127.0.0.1:9" in err and "is the server up" in err and err.count("\n") == 1


@pytest.mark.parametrize("uri, message", [
    ("gptmini@production", "not a registry URI"),
    ("models:/gptmini", "cannot parse"),
    ("models:/gptmini@staging", "no version with alias 'staging'"),
])
def test_bad_registry_uris_get_a_message_naming_the_fix(store, weights, uri, message):
    register(store, weights["worse"])
    with pytest.raises(registry.RegistryError, match=message):
        registry.resolve_model_uri(uri)


def test_generate_cli_loads_from_the_registry(store, weights, capsys):
    from gptmini.cli.generate import main as generate_main

    mc, _ = store
    _, v1 = register(store, weights["better"])
    registry.promote(mc, v1.version)
    code = generate_main(["--model", "models:/gptmini@production", "--prompt", "def", "--max-new-tokens", "8",
                          "--temperature", "0", "--device", "cpu"])
    assert code == 0
    assert capsys.readouterr().out.startswith("def")


def test_registry_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(registry.RegistryError, match="set MLFLOW_TRACKING_URI"):
        registry.client()
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


# Versions from the trainer's LoggedModels


def logged_model(store, weights_dir, name="best", step=10):
    mc, experiment_id = store
    run = mc.create_run(experiment_id)
    return registry.log_logged_model(mc, run.info.run_id, name, weights_dir, step, {"gptmini.step": str(step)})


def test_a_version_registered_from_a_logged_model_links_it_and_resolves_to_its_weights(store, weights):
    mc, _ = store
    model_id = logged_model(store, weights["better"])
    mv = registry.register_logged_model(mc, model_id, {"val_loss": "4.5"})
    assert mv.source == f"models:/{model_id}" and registry.source_model_id(mv) == model_id
    # Where MLflow's Models view finds the version (a SQL registry keeps no model_id on the version itself).
    assert json.loads(mc.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": "gptmini", "version": str(mv.version)}]
    assert mv.run_id == mc.get_logged_model(model_id).source_run_id and mv.tags["val_loss"] == "4.5"
    assert str(mc.get_model_version_by_alias("gptmini", "challenger").version) == str(mv.version)
    folder = registry.resolve_model_uri(f"models:/gptmini/{mv.version}")
    model, _ = load_model(folder)
    assert (folder / "model.safetensors").read_bytes() == (weights["better"] / "model.safetensors").read_bytes()
    assert model.num_params() > 0


def test_registering_a_logged_model_through_a_client_on_another_store_than_the_environments(store, weights,
                                                                                            monkeypatch):
    """MLflow's SQL registry looks the model up through the process-wide URI; ours must not depend on it."""
    mc, _ = store
    model_id = logged_model(store, weights["worse"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mv = registry.register_logged_model(mc, model_id, {})
    assert registry.source_model_id(mv) == model_id
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_typed_predict_takes_a_list_or_a_prompt_column_and_loads_without_warnings(store, weights):
    mc, _ = store
    mv = registry.register_logged_model(mc, logged_model(store, weights["better"]), {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(f"models:/gptmini/{mv.version}")
    assert [str(w.message) for w in caught] == []
    assert model.metadata.signature.params.to_dict()[0]["name"] == "max_new_tokens"
    greedy = {"max_new_tokens": 3, "temperature": 0.0, "quantize": "int8"}
    from_list = model.predict(["def", "class"], params=greedy)
    assert len(from_list) == 2 and all(isinstance(text, str) and text for text in from_list)
    assert model.predict(pd.DataFrame({"prompt": ["def", "class"]}), params=greedy) == from_list


def test_typed_predict_rejects_what_is_not_a_list_of_strings(store, weights):
    mc, _ = store
    mv = registry.register_logged_model(mc, logged_model(store, weights["worse"]), {})
    model = mlflow.pyfunc.load_model(f"models:/gptmini/{mv.version}")
    with pytest.raises(mlflow.exceptions.MlflowException, match="schema"):
        model.predict([1, 2])


def test_from_pretrained_loads_the_production_model_from_the_registry(store, tiny_weights):
    from gptmini import GPTOSSMini

    mc, _ = store
    _, mv = register(store, tiny_weights)
    registry.promote(mc, mv.version)
    model, tokenizer = GPTOSSMini.from_pretrained("models:/gptmini@production")
    assert type(model) is GPTOSSMini and tokenizer.name == "cl100k_base"
    reference, _ = load_model(tiny_weights)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name

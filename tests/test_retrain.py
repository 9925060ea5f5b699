"""Day-two retraining's decisions, pinned cheaply: when to skip, how long to continue, which parent fits,
how replay mixes batches, and a gate that will not promote a model that forgot."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from gptmini.cli.train import main as train_main
from gptmini.config import model_preset
from gptmini.data.loader import DistributedWindowSampler, ReplayLoader, SlidingWindowDataset, WindowLoader
from gptmini.gate import Comparison, decide, split_parts
from gptmini.retrain import MIN_STEPS, ParentMismatch, check_parent, continue_steps, skip_reason


def test_continue_steps_scale_with_the_new_text_and_stop_at_the_cap():
    # 2 passes over 9,600 new tokens at 256 tokens a step, a quarter of them replayed: 192 new tokens a step
    assert continue_steps(9_600, 256, 0.25, cap=300) == 100
    assert continue_steps(19_200, 256, 0.25, cap=300) == 200  # twice the text, twice the steps
    assert continue_steps(10**7, 256, 0.25, cap=300) == 300  # never more than training anew
    assert continue_steps(50, 256, 0.0, cap=300) == MIN_STEPS
    assert continue_steps(0, 256, 0.25, cap=300) == 0


def test_skip_only_when_production_saw_these_inputs():
    tags = {"data_inputs_key": "k1", "train_settings": "s1"}
    assert skip_reason(tags, "3", "k1", "s2", continuing=True) == \
        "production v3 already trained on this data (no new documents since its dataset)"
    assert skip_reason(tags, "3", "k1", "s1", continuing=False).startswith("production v3 already trained")
    assert skip_reason(tags, "3", "k1", "s2", continuing=False) is None  # from scratch, other settings: train
    assert skip_reason(tags, "3", "k2", "s1", continuing=True) is None  # new inputs: train
    assert skip_reason(None, None, "k1", "s1", continuing=True) is None  # no production yet
    assert skip_reason({}, "1", "k1", "s1", continuing=True) is None  # a version from before lineage tags


def test_skip_when_an_earlier_version_already_continued_production_on_these_inputs():
    """The gate kept production: the same continuation would register the same rejected model every night."""
    production = {"data_inputs_key": "k0", "train_settings": "s1"}
    tried = [("4", {"parent_version": "3", "data_inputs_key": "k1", "train_settings": "s1", "gate.decision": "rejected"})]
    assert skip_reason(production, "3", "k1", "s1", continuing=True, earlier=tried) == \
        "v4 already continued production v3 on this data with these settings and was not promoted (gate: rejected)"
    assert skip_reason(production, "3", "k2", "s1", continuing=True, earlier=tried) is None  # new text: train
    assert skip_reason(production, "3", "k1", "s2", continuing=True, earlier=tried) is None  # other settings
    assert skip_reason(production, "5", "k1", "s1", continuing=True, earlier=tried) is None  # production moved on
    assert skip_reason(production, "3", "k1", "s1", continuing=False, earlier=tried) is None  # from scratch


def test_a_parent_of_another_shape_or_tokenizer_is_refused_by_name():
    tiny = dataclasses.asdict(model_preset("tiny"))
    check_parent(tiny, {**tiny, "dropout": 0.1}, "cl100k_base", "runs/v1")  # dropout is a training setting
    with pytest.raises(ParentMismatch, match=r"runs/v1: its model config differs: d_model=256 \(this run: 64\)"):
        check_parent(tiny, {**tiny, "d_model": 256}, "cl100k_base", "runs/v1")
    with pytest.raises(ParentMismatch, match=r"the model reads 'gpt2' tokens but the data is tokenized with "
                                             r"'cl100k_base'; prepare the data .*--tokenizer gpt2"):
        check_parent(tiny, {**tiny, "tokenizer": "gpt2"}, "cl100k_base", "runs/v1")


def loader(values: np.ndarray, seed: int) -> WindowLoader:
    ds = SlidingWindowDataset(values, seq_len=3)
    return WindowLoader(ds, DistributedWindowSampler(len(ds), seed=seed), batch_size=4)


def test_replay_mixes_exactly_its_share_of_rows_and_resumes_where_it_stopped():
    new, old = np.arange(0, 400, dtype=np.uint32), np.arange(1000, 1400, dtype=np.uint32)
    mixed = ReplayLoader(loader(new, 0), loader(old, 1), replay=0.3, batch_size=4)
    rows = [mixed.next_batch()[0] for _ in range(9)]
    assert sum(int((x[:, 0] >= 1000).sum()) for x in rows) == 10  # floor(0.3 * 36 rows); 1 or 2 a batch
    state = mixed.state_dict()
    ahead = [mixed.next_batch()[0] for _ in range(3)]
    again = ReplayLoader(loader(new, 0), loader(old, 1), replay=0.3, batch_size=4)
    again.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(ahead, [again.next_batch()[0] for _ in range(3)]))


def comparison(old_difference: float) -> Comparison:
    parts = {"challenger_new": 2.0, "champion_new": 3.0, "new_difference": 1.0, "new_standard_error": 0.05,
             "challenger_old": 2.5 - old_difference, "champion_old": 2.5, "old_difference": old_difference,
             "old_standard_error": 0.01, "new_pieces": 5, "old_pieces": 20}
    return Comparison(2.3, 2.5, 0.2, 0.02, 25, 10_000, parts)


def test_the_gate_does_not_promote_a_model_that_forgot_the_old_text():
    assert decide("2", 2.3, "1", comparison(old_difference=-0.01)).promote  # within noise on the old text
    forgot = decide("2", 2.3, "1", comparison(old_difference=-0.05))
    assert not forgot.promote and "it forgot the old text: -0.0500 ± 0.0100 bits/byte" in forgot.reason


def test_split_parts_pairs_new_and_old_pieces_apart():
    a, b, nbytes = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 3.0, 5.0]), np.array([1.0, 1.0, 1.0, 1.0])
    parts = split_parts(a, b, nbytes, np.array([True, False, False, True]))
    assert parts["new_pieces"] == 2 and parts["old_pieces"] == 2
    assert parts["new_difference"] == pytest.approx(2.0 / 2 / np.log(2))
    assert parts["old_difference"] == 0.0
    assert split_parts(a, b, nbytes, None) is None


def test_train_with_a_parent_of_another_config_exits_2(tmp_path, prepared_shards, tiny_weights, capsys):
    code = train_main(["--preset", "demo", "--data-dir", str(prepared_shards), "--out", str(tmp_path / "run"),
                       "--steps", "1", "--init-from", str(tiny_weights)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"gptmini train: error: --init-from {tiny_weights}: its model config differs: d_ff=128 (this run: 1024)")


def test_the_incoming_folder_is_a_source_only_when_it_holds_text(tmp_path):
    from flows.tasks import incoming_sources

    folder = tmp_path / "incoming"
    assert incoming_sources(str(folder)) == [] and incoming_sources("") == []  # missing: no error, nothing
    folder.mkdir()
    (folder / ".partial.txt").write_text("being copied")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    assert incoming_sources(str(folder)) == []  # nothing prepare reads
    (folder / "new.txt").write_text("new text")
    assert incoming_sources(str(folder)) == [str(folder.resolve())]


@pytest.mark.slow  # an MLflow store and a registered version
def test_the_parent_manifest_arrives_with_the_parent_index_beside_it(tmp_path, small_shards, tiny_weights,
                                                                      monkeypatch):
    """What `prepare --since` reads to update the parent's index rather than index the grown corpus anew."""
    import shutil

    from flows.tasks import parent_manifest
    from gptmini import registry
    from gptmini.retrieval import build_index

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    data = shutil.copytree(small_shards, tmp_path / "data")
    entry = build_index(data).entry
    mc = registry.client()
    experiment = mc.create_experiment("retrain", artifact_location=(tmp_path / "artifacts").as_uri())
    run = mc.create_run(experiment).info.run_id
    mc.log_artifact(run, str(data / "manifest.json"), "data")
    mc.log_artifact(run, str(data / entry["file"]), "retrieval")
    version = registry.log_model_version(mc, run, tiny_weights, registry.index_tags(run, entry)).version
    manifest = Path(parent_manifest.fn(str(version), registry.MODEL_NAME, str(tmp_path / "state")))  # the task's body
    assert manifest.read_bytes() == (data / "manifest.json").read_bytes()
    assert (manifest.parent / entry["file"]).read_bytes() == (data / entry["file"]).read_bytes()

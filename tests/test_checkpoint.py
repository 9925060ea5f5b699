"""Checkpoint files: atomic commits, exact state round trips, and loading that never runs a pickle."""
from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmini import checkpoint, config, weights
from gptmini.loss import balance_loss, next_token
from gptmini.model import GPTOSSMini
from gptmini.parallel import DistEnv
from gptmini.optim import build_optimizer

ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SMALL = dict(vocab_size=512, tokenizer="cl100k_base")  # a small table: these tests never tokenize


def tiny_model() -> GPTOSSMini:
    torch.manual_seed(0)
    return GPTOSSMini(config.model_preset("tiny", vocab_size=512))


def trained(steps: int = 2) -> tuple[GPTOSSMini, torch.optim.Optimizer]:
    model = tiny_model()
    opt = build_optimizer(model, config.OptimConfig(lr=1e-2))
    for _ in range(steps):
        x = torch.randint(0, 512, (2, 8))
        loss = next_token(model, x, x) + balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def save(run: Path, step: int, model, opt) -> Path:
    return checkpoint.save_checkpoint(run, step, model, opt, {"step": step}, {"rng": checkpoint.rng_state()},
                                      "{}", "", ENV, keep_last=2)


def test_model_and_optimizer_state_round_trip_exactly(tmp_path):
    model, opt = trained()
    path = save(tmp_path, 2, model, opt)
    model2, opt2 = tiny_model(), None
    opt2 = build_optimizer(model2, config.OptimConfig(lr=1e-2))
    state, rank_state = checkpoint.load_checkpoint(path, model2, opt2, ENV)
    assert state["step"] == 2 and state["world_size"] == 1 and rank_state is not None
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


def test_rng_states_round_trip():
    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    checkpoint.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    model, opt = trained(1)
    save(tmp_path, 2, model, opt)
    good = save(tmp_path, 4, model, opt)
    shutil.copytree(good, good.with_name(".tmp_step_00000006"))  # killed before the rename
    unmarked = good.with_name("step_00000008")
    shutil.copytree(good, unmarked)
    (unmarked / "COMPLETE").unlink()  # killed before the marker (or tampered with)
    assert checkpoint.latest_checkpoint(tmp_path) == good
    assert checkpoint.resolve_resume("auto", tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(unmarked), tmp_path)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    model, opt = trained(1)
    for step in (1, 2, 3):
        save(tmp_path, step, model, opt)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]


class Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_tampered_metadata_is_refused_without_running_it(tmp_path):
    model, opt = trained(1)
    path = save(tmp_path, 1, model, opt)
    marker = tmp_path / "pwned"
    Exploit.marker = str(marker)
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(Exception, match="refusing to load"):
        checkpoint.load_checkpoint(path, tiny_model(), None, ENV)
    assert not marker.exists()


def test_load_model_reads_a_training_checkpoint_and_a_weights_folder(tmp_path, monkeypatch):
    from gptmini import weights

    model, opt = trained(1)
    cfg = config.from_preset("tiny")
    cfg.model = model.config
    path = checkpoint.save_checkpoint(tmp_path / "run", 1, model, opt, {"step": 1}, {}, config.to_json(cfg),
                                      config.to_toml(cfg), ENV, keep_last=1)
    weights.save_pretrained(model, tmp_path / "run" / "final")
    # A 512-row table cannot hold cl100k ids; load_model checks the tokenizer only for weights folders.
    from_ckpt, _ = weights.load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(from_ckpt.state_dict()[k], v), k
    with pytest.raises(ValueError, match="neither a weights folder"):
        weights.load_model(tmp_path / "run" / "checkpoints")

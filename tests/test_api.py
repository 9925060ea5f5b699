"""The Python API (`from gptmini import GPTOSSMini, GPTTrainer`): the seed's Basic Usage as written, generation
through the library's decode loop, loading, and the trainer that is `gptmini train`'s recipe in this process."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptmini import GPTOSSMini, GPTTrainer, SlidingWindowDataset, api, rag
from gptmini.cli.train import parse_args
from gptmini.config import PRESETS
from gptmini.data.prepare import read_manifest
from gptmini.errors import UserError
from gptmini.metrics import read_metrics
from gptmini.retrieval import Index, build_index
from gptmini.tokenizer import Tokenizer, get_tokenizer
from model_helpers import sharp_model, tiny
from train_helpers import COMMON, STEPS

pytestmark = pytest.mark.usefixtures("one_thread", "own_cache")
ROOT = Path(__file__).resolve().parents[1]


def test_the_loader_answers_to_its_old_documented_name():
    from gptmini import checkpoint, weights
    from gptmini.checkpoint import load_model

    assert load_model is weights.load_model
    with pytest.raises(AttributeError, match="no attribute 'no_such_loader'"):
        checkpoint.no_such_loader  # noqa: B018


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory):
    """The trained tokenizers these tests load are copied into a cache of their own, not the developer's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTMINI_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def test_the_package_root_imports_nothing_until_a_name_is_used():
    code = "import sys, gptmini; print(sorted(m for m in sys.modules if m.startswith(('gptmini', 'torch'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "['gptmini']", proc.stdout + proc.stderr[-2000:]


def test_the_package_root_exports_the_public_names():
    import gptmini

    assert gptmini.GPTOSSMini is api.GPTOSSMini and gptmini.GPTTrainer is api.GPTTrainer
    assert set(gptmini.__all__) == {*gptmini.PUBLIC, "__version__"}
    assert all(getattr(gptmini, name) is not None for name in gptmini.PUBLIC)
    with pytest.raises(AttributeError, match="public names are GPTOSSMini, GPTTrainer"):
        gptmini.NoSuchThing  # noqa: B018


@pytest.fixture(scope="module")
def small(small_shards) -> tuple[Path, Tokenizer]:
    """The session's 300-id BPE shards and their tokenizer: the models stay a fraction of a cl100k model, so
    steps, checkpoints and evaluations take milliseconds."""
    return small_shards, get_tokenizer(read_manifest(small_shards)["tokenizer"], small_shards)


def tiny_config(tokenizer: Tokenizer) -> dict:
    """The tiny preset's model as the seed's dict, sized to the tokenizer."""
    return {**PRESETS["tiny"]["model"], "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name}


def test_seed_basic_usage_runs_as_written(small, tmp_path, monkeypatch):
    """The seed's five lines, `gpt_oss_mini` read as `gptmini`, on the tiny preset's model."""
    monkeypatch.chdir(tmp_path)  # the trainer's default run folder is runs/notebook-<time>
    _, tokenizer = small
    config = tiny_config(tokenizer)
    train_data = (ROOT / "README.md").read_text()[:6000]
    ids = np.array(tokenizer.encode(train_data), dtype=np.uint32)
    train_loader = torch.utils.data.DataLoader(SlidingWindowDataset(ids[:300], 16), batch_size=4, shuffle=True)
    val_loader = torch.utils.data.DataLoader(SlidingWindowDataset(ids[300:400], 16), batch_size=4)
    input_ids = torch.tensor(ids[None, :5], dtype=torch.long)

    from gptmini import GPTOSSMini, GPTTrainer

    # Create model
    model = GPTOSSMini(**config)

    # Train on your data
    trainer = GPTTrainer(model, tokenizer, train_data)
    trainer.train(train_loader, val_loader)

    # Generate text
    generated = model.generate(input_ids, max_new_tokens=50)

    assert generated.shape == (1, 5 + 50) and torch.equal(generated[:, :5].cpu(), input_ids)
    steps = [r["step"] for r in trainer.history if r["kind"] == "train"]
    assert steps[-1] == len(train_loader) == 5  # one pass over the loader: 18 windows in batches of 4
    assert any(r["kind"] == "val" for r in trainer.history)
    assert (trainer.out_dir / "checkpoints" / "best" / "model.safetensors").is_file()


def test_trainer_records_the_tokenizer_it_trains_with(small, tmp_path):
    _, tokenizer = small
    model = GPTOSSMini(**{**tiny_config(tokenizer), "tokenizer": "cl100k_base"})  # the dict's default
    GPTTrainer(model, tokenizer, [1, 2, 3], out_dir=tmp_path / "run")
    assert model.config.tokenizer == tokenizer.name  # what its checkpoints' config.json will say


def test_model_called_with_targets_returns_logits_and_the_training_loss():
    """`logits, loss = model(x, y)`, as docs/python-api.md (and nanoGPT) write it: the cross-entropy plus, in
    training mode, the MoE balance term; without targets, the logits alone."""
    from gptmini.loss import balance_loss, cross_entropy

    model = GPTOSSMini(sharp_model(tiny()).config)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    logits, loss = model(x, y)
    assert logits.shape == (2, 8, 256) and torch.equal(logits, model(x))
    assert float(balance_loss(model)) > 0  # training mode, MoE: the term is there to be counted
    assert loss.item() == pytest.approx((cross_entropy(logits, y) + balance_loss(model)).item(), rel=1e-6)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None
    model.eval()
    assert model(x, y)[1].item() == pytest.approx(cross_entropy(model(x), y).item(), rel=1e-6)


def test_generate_greedy_equals_a_full_recompute_argmax_loop():
    model = GPTOSSMini(tiny())
    model.load_state_dict(sharp_model(tiny()).state_dict())
    model.eval()
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    seq = prompt
    for _ in range(12):
        logits = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert out.shape == (2, 7 + 12)
    assert torch.equal(out, seq)
    assert len(set(seq[0, 7:].tolist())) > 2  # sharp weights: the continuation is not one repeated token


def test_generate_with_retrieval_is_the_rag_loop_and_cites_what_it_read(small, tmp_path):
    data, tokenizer = small
    data = shutil.copytree(data, tmp_path / "data")
    build_index(data)
    model = GPTOSSMini(**tiny_config(tokenizer))
    model.load_state_dict(sharp_model(model.config).state_dict())
    model.eval()
    prompt = "The with statement calls the context manager"
    text, cited = model.generate_with_retrieval(prompt, tokenizer, data, max_new_tokens=9, k=2, stride=3,
                                                temperature=0)
    index = Index.of(data)
    expected = rag.generate(index, tokenizer, [tokenizer.eot_token] + tokenizer.encode(prompt), 9,
                            rag.model_complete(model, tokenizer), model.config.max_seq_len, rag.RagOptions(2, 3))
    assert text == tokenizer.decode(expected.ids) and len(expected.ids) == 9
    assert [p.id for p in cited] == [p.id for p in expected.citations]
    assert cited[:2] == index.search(prompt, 2)  # the first retrieval: the prompt's best passages
    assert model.generate_with_retrieval(prompt, tokenizer, index, max_new_tokens=9, k=2, stride=3,
                                         temperature=0) == (text, cited)  # an Index, or its folder
    with pytest.raises(UserError, match="retrieval k=0 is out of range; use 1 to 50"):
        model.generate_with_retrieval(prompt, tokenizer, index, k=0)


def test_from_pretrained_loads_a_weights_folder_as_the_api_model(tiny_weights):
    model, tokenizer = GPTOSSMini.from_pretrained(tiny_weights)
    assert type(model) is GPTOSSMini and not model.training and tokenizer.name == "cl100k_base"
    reference, _ = api.weights.load_model(tiny_weights)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_trainer_repeats_gptmini_train_loss_for_loss(small, reference_runs, tmp_path):
    """The session's reference run of `gptmini train` (one process, 2x accumulation, 8 steps, deterministic)
    and GPTTrainer on the same config, data and seed log the very same losses, learning rates, gradient norms
    and val losses, and both keep the best checkpoint and the final weights."""
    shards, tokenizer = small
    cfg = parse_args(["--grad-accum", "2", *COMMON, "--data-dir", str(shards), "--out", str(tmp_path / "api")])
    cfg.model.tokenizer, cfg.model.vocab_size = tokenizer.name, tokenizer.vocab_size  # as `gptmini train` takes the data's
    torch.manual_seed(cfg.train.seed)  # what `gptmini train` seeds the model's init with
    model = GPTOSSMini(cfg.model)
    trainer = GPTTrainer(model, tokenizer, shards, config=cfg)
    try:
        summary = trainer.train()
    finally:
        torch.use_deterministic_algorithms(False)  # --deterministic set it for this whole process

    def records(history):
        return [{k: r[k] for k in ("kind", "step", "loss", "lr", "grad_norm", "val_loss") if k in r} for r in history]

    assert records(trainer.history) == records(read_metrics(reference_runs["1p"] / "metrics.jsonl"))
    assert [r["step"] for r in trainer.history if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert summary["status"] == "completed" and summary["best_step"] in (4, 8)
    assert (tmp_path / "api" / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "api" / "final" / "model.safetensors").is_file()


def test_trainer_on_token_ids_continues_when_asked_for_more_steps(small, tmp_path):
    _, tokenizer = small
    ids = tokenizer.encode((ROOT / "README.md").read_text()[:3000])
    model = GPTOSSMini(**tiny_config(tokenizer))
    trainer = GPTTrainer(model, tokenizer, torch.tensor(ids), out_dir=tmp_path / "run", steps=2, seq_len=16,
                         batch_size=2, log_every=1, eval_every=2, eval_batches=1, warmup_steps=1, live=False)
    assert trainer.train()["steps"] == 2
    assert trainer.train(steps=4)["steps"] == 4
    train = [r for r in trainer.history if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in trainer.history if r["kind"] == "val"] == [2, 4]
    # The schedule spans the 4 steps asked for last: warmup, then cosine down to min_lr at step 4.
    assert train[-1]["lr"] < train[-2]["lr"] < train[0]["lr"] <= PRESETS["demo"]["optim"]["lr"]
    with pytest.raises(api.ConfigError, match="already at step 4"):
        trainer.train(steps=4)


def test_trainer_refuses_bad_settings_and_data_with_one_clear_error(small, tmp_path):
    _, tokenizer = small
    model = GPTOSSMini(**tiny_config(tokenizer))
    with pytest.raises(api.ConfigError, match=r"unknown setting\(s\) learning_rate; valid settings: .*\blr\b"):
        GPTTrainer(model, tokenizer, [1, 2, 3], learning_rate=1e-3)
    with pytest.raises(api.ConfigError, match=r"data.seq_len = 512 must be in 1..model.max_seq_len \(128\)"):
        GPTTrainer(model, tokenizer, [1, 2, 3], seq_len=512)
    bad_data = {"no training data: pass train_data": None,
                rf"token ids must lie in \[0, vocab_size={tokenizer.vocab_size}\), got 0..600; encode with the model's "
                r"tokenizer": [0, 600],
                r"one flat sequence of integers, got int64 of shape \(2, 2\)": np.zeros((2, 2), dtype=np.int64)}
    for message, data in bad_data.items():
        with pytest.raises(api.UserError, match=message):
            GPTTrainer(model, tokenizer, data, out_dir=tmp_path / "run").train()
    assert not (tmp_path / "run").exists()  # refused before anything was written

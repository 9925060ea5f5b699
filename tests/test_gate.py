"""The champion/challenger gate decides on bits per byte, paired piece by piece on the same val text, and
promotes only beyond noise: real tiny models trained on the embedded corpus, no MLflow (tests/test_registry.py
runs the gate through the registry)."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from gptmini import gate
from gptmini.weights import load_model
from gptmini.config import model_preset
from gptmini.data.loader import SlidingWindowDataset, TokenShards
from gptmini.data.prepare import PrepareConfig, prepare
from gptmini.evaluate import piece_sums
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer, padded_vocab_size
from model_helpers import trained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(small_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    out = {"barely": trained(small_shards, root / "barely", 3, 0),
           "seed0": trained(small_shards, root / "seed0", 40, 0),
           "seed1": trained(small_shards, root / "seed1", 40, 1)}
    out["copy"] = shutil.copytree(out["seed0"], root / "copy")
    return out


@pytest.fixture(scope="module")
def sums(models, small_shards):
    """Each model's (nats, bytes, tokens) per val piece, as gate.compare measures them, once."""
    out = {}
    for name, path in models.items():
        model, tok = load_model(path)
        out[name] = piece_sums(model, tok, small_shards)
    return out


def versus(sums, challenger: str, champion: str) -> gate.Comparison:
    return gate.paired(sums[challenger][0], sums[champion][0], sums[challenger][1])


def test_paired_standard_error_is_the_ratio_estimators():
    rng = np.random.default_rng(0)
    nbytes = np.full(50, 400.0)
    champion = rng.normal(1000, 50, 50)
    challenger = champion - rng.normal(10, 5, 50)
    c = gate.paired(challenger, champion, nbytes)
    per_piece = (champion - challenger) / math.log(2) / 400  # equal pieces: a plain mean and its standard error
    assert c.difference == pytest.approx(per_piece.mean())
    assert c.standard_error == pytest.approx(per_piece.std(ddof=1) / math.sqrt(50))
    assert (c.pieces, c.val_bytes) == (50, 20_000)


def test_a_clearly_better_model_is_promoted(models, sums, small_shards):
    c = gate.compare(models["seed0"], models["barely"], small_shards)
    assert c == versus(sums, "seed0", "barely")
    decision = gate.decide("2", c.challenger_val_bpb, "1", c, 0.0)
    assert c.difference > 5 * c.standard_error > 0 and decision.promote
    assert "standard errors" in decision.reason and f"{c.pieces} val pieces" in decision.reason
    assert decision.difference == c.difference and decision.standard_error == c.standard_error


def test_a_difference_within_two_standard_errors_is_not_promoted_and_beyond_it_is(sums):
    """The threshold itself, on a real model's per-piece sums: a challenger that is better on some pieces and
    worse on others, by a shift of 1.9 standard errors, stays out; shifted by 2.1, it is promoted.

    Another seed is not a noise control: two tiny models trained with different seeds differ on this val
    text by up to 10 standard errors, a real difference the gate is right to see."""
    nats, nbytes, _ = sums["seed0"]
    wobble = np.where(np.arange(len(nats)) % 2 == 0, 1.0, -1.0) * 0.05 * nats
    level = versus({"a": (nats - wobble, nbytes), "b": (nats, nbytes)}, "a", "b")
    assert level.standard_error > 0
    for shift, promoted in ((0.0, False), (1.9, False), (2.1, True)):
        # Bits taken from every piece in proportion to its bytes, so that the difference is `shift` standard
        # errors; the spread around it, and so the standard error, is unchanged.
        lower = (shift * level.standard_error - level.difference) * math.log(2) * nbytes
        c = versus({"a": (nats - wobble - lower, nbytes), "b": (nats, nbytes)}, "a", "b")
        assert c.difference == pytest.approx(shift * level.standard_error)
        assert c.standard_error == pytest.approx(level.standard_error)
        decision = gate.decide("2", c.challenger_val_bpb, "1", c, 0.0)
        assert decision.promote == promoted, decision.reason
        assert ("not better beyond noise" in decision.reason) != promoted
        reverse = versus({"a": (nats, nbytes), "b": (nats - wobble - lower, nbytes)}, "a", "b")
        assert not gate.decide("2", reverse.challenger_val_bpb, "1", reverse, 0.0).promote


def test_a_copy_of_the_champion_is_not_promoted(sums):
    c = versus(sums, "copy", "seed0")
    assert c.difference == 0.0 and c.standard_error == 0.0
    assert not gate.decide("2", c.challenger_val_bpb, "1", c, 0.0).promote


def test_min_improvement_is_in_bits_per_byte(sums):
    c = versus(sums, "seed0", "barely")
    assert not gate.decide("2", c.challenger_val_bpb, "1", c, min_improvement=c.difference + 0.01).promote


def test_models_with_different_tokenizers_compare_on_the_same_text(models, sums, small_shards, tmp_path, monkeypatch):
    """A model on a 512-id BPE against one on a 300-id BPE: the same pieces and bytes from either data folder, so the
    comparison does not depend on which tokenizer cut the val split."""
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    bpe_data = tmp_path / "bpe"
    prepare(PrepareConfig(["embedded:python-docs"], bpe_data, tokenizer="bpe:512", workers=1,
                          cache_dir=tmp_path / "cache"))
    tok = get_tokenizer(TokenShards.open(bpe_data, "val").manifest["tokenizer"], bpe_data)
    assert tok.n_vocab == 512 and padded_vocab_size(512) == 512
    bpe_model = trained(bpe_data, tmp_path / "bpe-model", 40, 0)
    here, there = gate.compare(bpe_model, models["seed0"], bpe_data), gate.compare(bpe_model, models["seed0"], small_shards)
    assert here.val_bytes == there.val_bytes and here.pieces == there.pieces
    assert here.difference == pytest.approx(there.difference, rel=1e-6)
    assert here.champion_val_bpb == pytest.approx(versus(sums, "seed0", "copy").challenger_val_bpb, rel=1e-6)

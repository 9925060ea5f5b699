"""Weight-only int8 (`gptmini.quantize`): what it covers, how close it stays, what it refuses."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from model_helpers import sharp_model, tiny

from gptmini import quantize
from gptmini.config import model_preset
from gptmini.data.loader import SlidingWindowDataset, TokenShards
from gptmini.evaluate import evaluate_split
from gptmini.generate import generate
from gptmini.loss import balance_loss, next_token
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def matmul_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.dim() >= 2)


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=0, tie_embeddings=False), dict(d_model=72, n_heads=4)],
                         ids=["moe-tied", "dense-untied", "in-features-not-a-multiple-of-16"])
def test_int8_covers_every_matmul_weight_but_the_router(overrides):
    model = sharp_model(tiny(**overrides))
    full = matmul_bytes(model)
    quantize.apply(model, "int8")
    assert [n for n, p in model.named_parameters() if p.dim() >= 2] == [
        n for n, _ in model.named_parameters() if n.endswith("feed_forward.gate.weight")]
    assert matmul_bytes(model) < 0.27 * full  # int8 and one fp32 scale per row


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=0), dict(num_experts=0, sliding_window=6)],
                         ids=["moe", "dense", "sliding-window"])
def test_int8_next_token_agrees_with_full_precision(overrides):
    model = sharp_model(tiny(vocab_size=384, **overrides), std=0.1)
    x = torch.randint(0, 384, (4, 32))
    with torch.no_grad():
        ref = model(x)
        got = quantize.apply(model, "int8")(x)
    # A random model has many near-ties for first place, and a near-tie between two experts can flip a
    # token's routing (a large change at that one position): agreement is high but not total, so the error
    # is bounded on average. A trained model is checked on its val loss below.
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9
    assert (ref - got).abs().mean() < 0.05 * ref.abs().mean()


def test_int8_val_loss_of_a_trained_model_is_within_0_02_nats(small_shards):
    torch.manual_seed(0)
    manifest = TokenShards.open(small_shards, "train").manifest
    model = GPTOSSMini(model_preset("tiny", vocab_size=manifest["vocab_size"], tokenizer=manifest["tokenizer"]))
    windows = SlidingWindowDataset(TokenShards.open(small_shards, "train"), 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(15):
        x, y = windows.batch(np.arange(step * 4, step * 4 + 4))
        (next_token(model, x, y) + balance_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tok = get_tokenizer(manifest["tokenizer"], small_shards)
    full = evaluate_split(model, tok, small_shards, seq_len=32, batch_size=8)["val_loss"]
    int8 = evaluate_split(quantize.apply(model, "int8"), tok, small_shards, seq_len=32, batch_size=8)["val_loss"]
    assert full < math.log(manifest["vocab_size"]) - 1  # trained: the random init sits at ln(vocab)
    assert abs(int8 - full) < 0.02


def test_unknown_modes_and_models_that_cannot_be_quantized_are_refused():
    model = sharp_model(tiny())
    with pytest.raises(quantize.QuantizeError, match="'int4'.*choose one of: none, int8"):
        quantize.apply(model, "int4")
    assert quantize.apply(model, "none") is model and not quantize.is_quantized(model)
    with pytest.raises(quantize.QuantizeError, match="cannot quantize a Sequential"):
        quantize.apply(nn.Sequential(model), "int8")
    quantize.apply(model, "int8")
    with pytest.raises(quantize.QuantizeError, match="already quantized"):
        quantize.apply(model, "int8")


def test_generate_cli_runs_int8_and_refuses_an_unknown_mode(tiny_weights, capsys):
    from gptmini.cli.generate import main as generate_main

    argv = ["--checkpoint", str(tiny_weights), "--prompt", "def", "--temperature", "0", "--max-new-tokens", "4"]
    assert generate_main([*argv, "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith("def")
    with pytest.raises(SystemExit) as exit_:
        generate_main([*argv, "--quantize", "int4"])
    assert exit_.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=0, tie_embeddings=False)], ids=["moe-tied", "dense-untied"])
def test_full_precision_inference_lays_the_weights_out_for_decoding_and_computes_the_same(overrides):
    model = sharp_model(tiny(**overrides)).eval()
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    tokens = generate(model, x, 8, temperature=0.0)
    assert quantize.apply(model, "none") is model
    # Every matmul weight (an untied embedding is a lookup table and stays row-major), the router too.
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("tok_embeddings")]
    matrices += [model.output.weight]
    assert all(p.stride(-2) == 1 and p.stride(-1) == p.shape[-2] for p in matrices)  # column-major
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, x, 8, temperature=0.0), tokens)
    # A laid-out model still quantizes (the int8 kernel reads row-major int8), to the logits of int8 weights
    # quantized from the row-major original.
    row_major = quantize.apply(sharp_model(tiny(**overrides)).eval(), "int8")
    quantize.apply(model, "int8")
    with torch.no_grad():
        int8, expected = model(x), row_major(x)
    torch.testing.assert_close(int8, expected, rtol=1e-5, atol=1e-5)

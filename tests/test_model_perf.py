"""The losses' performance paths compute the same function as the plain ones, on CPU."""
from __future__ import annotations

import pytest
import torch

from gptmini.config import model_preset
from gptmini.loss import chunked, chunked_cross_entropy, next_token, token_losses
from gptmini.model import GPTOSSMini


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_full_logits_loss_and_its_gradients(tie):
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", vocab_size=1000, tie_embeddings=tie))
    x = torch.randint(0, 1000, (3, 40))
    y = torch.randint(0, 1000, (3, 40))
    y[0, :7] = -1  # ignored targets count in neither path
    full = next_token(model, x, y)
    full.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    lean = chunked(model, x, y)
    lean.backward()
    torch.testing.assert_close(lean, full, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_cross_entropy_matches_under_bf16_autocast():
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    w = torch.randn(1000, 64, requires_grad=True)
    t = torch.randint(0, 1000, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = torch.nn.functional.cross_entropy((h @ w.t()).float(), t)
    gh, gw = torch.autograd.grad(full, (h, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = chunked_cross_entropy(h, w, t, chunk_size=64)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ch, gh, rtol=2e-2, atol=1e-4)  # bf16 matmuls, rounded at different points
    torch.testing.assert_close(cw, gw, rtol=2e-2, atol=1e-4)


def test_chunk_size_does_not_change_the_loss():
    torch.manual_seed(0)
    h, w, t = torch.randn(257, 32), torch.randn(500, 32), torch.randint(0, 500, (257,))
    losses = [chunked_cross_entropy(h, w, t, chunk_size=c) for c in (1, 7, 256, 257, 1000)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])


def test_token_losses_equal_the_logits_cross_entropy_per_token():
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", vocab_size=1000)).eval()
    x, y = torch.randint(0, 1000, (3, 40)), torch.randint(0, 1000, (3, 40))
    y[1, 5:9] = -1
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, ignore_index=-1, reduction="none")
        torch.testing.assert_close(token_losses(model, x, y), expected, rtol=1e-5, atol=1e-6)

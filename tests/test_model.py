import json

import pytest
import torch
import torch.nn.functional as F
from model_helpers import SEED_CONFIG, sharp_model, tiny

from gptmini.config import model_preset
from gptmini.loss import balance_loss, cross_entropy, next_token
from gptmini.model import GPTOSSMini
from gptmini.model import MoE, RMSNorm, SwiGLU, rope_inv_freq
from gptmini.weights import load_pretrained, save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seed_config_dict_builds_the_model_verbatim():
    with torch.device("meta"):  # 736M parameters: shapes only
        model = GPTOSSMini(**SEED_CONFIG)
    assert {k: getattr(model.config, k) for k in SEED_CONFIG} == SEED_CONFIG
    assert {k: getattr(model_preset("seed"), k) for k in SEED_CONFIG} == SEED_CONFIG


def test_seed_parameter_count_matches_closed_form():
    V, D, L, H, KV, F_, E, K = (SEED_CONFIG[k] for k in
                                ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "num_experts", "top_k"))
    hd = D // H
    attention = D * H * hd + 2 * D * KV * hd + H * hd * D  # wq, wk, wv, wo
    experts = E * 3 * D * F_  # w1, w2, w3 per expert
    per_layer = attention + D * E + experts + 2 * D  # + router + two RMSNorms
    total = V * D + L * per_layer + D  # tied embedding/output + final norm
    active = total - L * (E - K) * 3 * D * F_
    with torch.device("meta"):
        model = GPTOSSMini(model_preset("seed"))
    assert model.num_params() == total == 735_898_368
    assert model.num_active_params() == active
    assert model.flops_per_token(2048) == 6 * active + 12 * L * D * 2048


def test_untied_model_counts_the_output_projection():
    tied, untied = GPTOSSMini(tiny()), GPTOSSMini(tiny(tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 256 * 64
    assert untied.output.weight is not untied.tok_embeddings.weight


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(n_heads=12, n_kv_heads=5), ["n_heads=12", "n_kv_heads=5"]),
        (dict(num_experts=4, top_k=5), ["top_k=5", "num_experts=4"]),
        (dict(d_model=100, n_heads=12, n_kv_heads=3), ["d_model=100", "n_heads=12"]),
        (dict(rope_scaling="yarn"), ["rope_scaling='yarn'"]),
        (dict(dropout=1.5), ["dropout=1.5"]),
    ],
)
def test_bad_config_raises_a_clear_value_error(overrides, words):
    with pytest.raises(ValueError) as err:
        GPTOSSMini(**{**SEED_CONFIG, **overrides})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_config_key_names_the_key():
    with pytest.raises(ValueError, match="n_head"):
        GPTOSSMini(**{**SEED_CONFIG, "n_head": 12})


def test_rmsnorm_matches_torch_rmsnorm():
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 7, 64) * 4
    torch.testing.assert_close(ours(x), ref(x))


def test_model_is_causal():
    model = sharp_model(tiny(sliding_window=6))
    x = torch.randint(0, 256, (2, 24))
    y = x.clone()
    y[:, 15] = (y[:, 15] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    # Not bit-exact: the expert matmuls see different token groups, so BLAS may block them differently.
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert (a[:, 15:] - b[:, 15:]).abs().amax() > 1e-2


def test_sliding_window_hides_tokens_beyond_the_window():
    model = sharp_model(tiny(n_layers=1, sliding_window=4))
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 256  # seen by positions 5..8 only
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, 9:], b[:, 9:], rtol=0, atol=1e-5)
    assert (a[:, 8] - b[:, 8]).abs().amax() > 1e-2


def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_group():
    gqa = sharp_model(tiny(n_heads=4, n_kv_heads=2, num_experts=0))
    mha = GPTOSSMini(tiny(n_heads=4, n_kv_heads=4, num_experts=0)).eval()
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for i in range(gqa.config.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            heads = state[key].view(2, hd, -1)  # (n_kv, hd, D)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, -1)  # query heads 0,1 share kv head 0
    mha.load_state_dict(state)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x))


def test_mha_attention_matches_explicit_softmax_attention():
    model = sharp_model(tiny(n_heads=4, n_kv_heads=4))
    attn = model.layers[0].attention
    B, T, H, hd = 2, 9, 4, 16
    x = torch.randn(B, T, 64)
    cos, sin = model_rope(model, T)
    q = attn.wq(x).view(B, T, H, hd).transpose(1, 2)
    k = attn.wk(x).view(B, T, H, hd).transpose(1, 2)
    v = attn.wv(x).view(B, T, H, hd).transpose(1, 2)
    q, k = (t * cos + torch.cat((-t[..., hd // 2:], t[..., : hd // 2]), -1) * sin for t in (q, k))
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin, None), expected.detach())


def model_rope(model, T):
    from gptmini.model import rope_cos_sin

    return rope_cos_sin(torch.arange(T)[None], model.inv_freq)


def test_moe_with_one_expert_equals_dense_swiglu():
    cfg = tiny(num_experts=1, top_k=1)
    assert isinstance(GPTOSSMini(cfg).layers[0].feed_forward, SwiGLU)  # num_experts=1 builds the dense model
    torch.manual_seed(0)
    moe, dense = MoE(cfg), SwiGLU(cfg.d_model, cfg.d_ff)
    for w in ("w1", "w2", "w3"):
        torch.nn.init.normal_(getattr(moe, w), std=0.1)
        getattr(dense, w).weight.data.copy_(getattr(moe, w)[0])
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        y, aux, load = moe(x)
        torch.testing.assert_close(y, dense(x))
    assert load.tolist() == [10] and aux.item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_looped_expert_paths_agree(dtype):
    # torch._grouped_mm runs on CPU (torch >= 2.9, a reference loop inside ATen), so both paths run here;
    # on an H100 in bf16 the model uses the fused kernel.
    torch.manual_seed(0)
    moe = MoE(tiny(num_experts=4, top_k=2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe = moe.to(dtype)
    x = torch.randn(37, 64, dtype=dtype)
    with torch.no_grad():
        probs = moe.gate(x).float().softmax(-1)
    weights, experts = probs.topk(2, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    experts = experts.clone()
    experts[:3] = torch.tensor([0, 1])  # expert 3 gets no token: an empty group must work
    experts[experts == 3] = 2
    load = F.one_hot(experts.flatten(), 4).sum(0)
    outs, grads = [], []
    for run in (moe.experts_grouped, moe.experts_looped):
        moe.zero_grad()
        y = run(x, weights, experts, load)
        y.backward(torch.ones_like(y))
        outs.append(y.detach().float())
        grads.append(moe.w1.grad.float().clone())
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
    assert load[3] == 0


def test_ntk_scaling_changes_nothing_inside_the_trained_length():
    plain = sharp_model(tiny(max_seq_len=16))
    scaled = GPTOSSMini(tiny(max_seq_len=16, rope_scaling="ntk", rope_factor=4.0)).eval()
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        x = torch.randint(0, 256, (2, 16))
        torch.testing.assert_close(plain(x), scaled(x), rtol=0, atol=0)
        x = torch.randint(0, 256, (2, 40))  # beyond max_seq_len the base grows
        assert (plain(x) - scaled(x)).abs().amax() > 1e-3


def test_aux_loss_is_added_in_training_only():
    model = sharp_model(tiny(aux_loss_coef=0.5))
    x = torch.randint(0, 256, (2, 16))
    model.eval()
    logits = model(x)
    ce = F.cross_entropy(logits.view(-1, 256), x.view(-1))
    torch.testing.assert_close(next_token(model, x, x) + balance_loss(model), ce)
    model.train()  # the tiny preset has dropout 0, so training mode changes only the loss
    train_loss = next_token(model, x, x) + balance_loss(model)
    torch.testing.assert_close(train_loss, ce + 0.5 * model.last_aux_loss)
    assert model.last_aux_loss.item() >= 1.0  # 1.0 is perfect balance
    assert model.last_expert_load.sum().item() == 2 * 16 * 2 * 2  # tokens * top_k * layers


def test_dense_model_reports_zero_aux_loss():
    model = GPTOSSMini(tiny(num_experts=0))
    model(torch.randint(0, 256, (1, 8)))
    assert model.last_aux_loss.item() == 0.0 and model.last_expert_load is None
    assert model.num_active_params() == model.num_params()


def test_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = GPTOSSMini(tiny(dropout=0.1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 17))
    losses = []
    for _ in range(15):
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_targets_of_minus_one_are_ignored():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (1, 8))
    t = x.clone()
    t[:, :4] = -1
    logits = model(x)
    torch.testing.assert_close(cross_entropy(logits, t), F.cross_entropy(logits[0, 4:], x[0, 4:]))


def test_scaled_init_shrinks_residual_projections():
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("tiny", vocab_size=256, n_layers=8, d_model=256, d_ff=512))
    wq = model.layers[0].attention.wq.weight.std().item()
    wo = model.layers[0].attention.wo.weight.std().item()
    assert wq == pytest.approx(0.02, rel=0.05)
    assert wo == pytest.approx(0.02 / 4, rel=0.05)  # 0.02 / sqrt(2 * 8)
    assert model.layers[0].feed_forward.w2.std().item() == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_pretrained_round_trip(tmp_path, tie):
    model = sharp_model(model_preset("tiny", tie_embeddings=tie))
    save_pretrained(model, tmp_path / "final")
    save_pretrained(model, tmp_path / "final")  # replacing a folder works and leaves no temp folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "final" / "config.json").read_text())["tokenizer"] == "cl100k_base"
    loaded, tok = load_pretrained(tmp_path / "final")
    assert tok.name == "cl100k_base" and not loaded.training
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == tie
    x = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_pretrained_rejects_a_vocab_smaller_than_the_tokenizer(tmp_path):
    save_pretrained(GPTOSSMini(tiny()), tmp_path / "m")  # vocab 256 but tokenizer cl100k_base
    with pytest.raises(ValueError, match="vocab_size=256"):
        load_pretrained(tmp_path / "m")


def test_load_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nope")


def test_bf16_autocast_training_step_runs_and_matches_fp32_loosely():
    model = sharp_model(tiny(), std=0.05).train()
    x = torch.randint(0, 256, (2, 16))
    ref = cross_entropy(model(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = cross_entropy(logits, x)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast_to_bf16():
    model = GPTOSSMini(model_preset("tiny", vocab_size=256)).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.inv_freq, rope_inv_freq(model.config.head_dim, model.config.rope_theta))

"""Parity with the Hugging Face implementations the ecosystem runs."""
import json

import pytest
import torch
from model_helpers import sharp_model, tiny

from gptmini.hf import export_hf
from gptmini.cli.export_hf import main as export_main
from gptmini.config import model_preset
from gptmini.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")

CASES = {
    "moe-gqa-tied": (dict(n_heads=4, n_kv_heads=2, num_experts=4, top_k=2), "MixtralForCausalLM"),
    "moe-mqa-untied": (dict(n_heads=4, n_kv_heads=1, num_experts=3, top_k=1, tie_embeddings=False), "MixtralForCausalLM"),
    "dense-gqa-tied": (dict(n_heads=4, n_kv_heads=2, num_experts=0), "LlamaForCausalLM"),
    "dense-mha-untied": (dict(n_heads=4, n_kv_heads=4, num_experts=1, tie_embeddings=False), "LlamaForCausalLM"),
    "moe-window": (dict(n_kv_heads=2, sliding_window=6), "MixtralForCausalLM"),
    "dense-window": (dict(n_kv_heads=2, num_experts=0, sliding_window=6), "MistralForCausalLM"),
    "moe-ntk-beyond-max-len": (dict(rope_scaling="ntk", rope_factor=2.0, max_seq_len=12, rope_theta=500.0), "MixtralForCausalLM"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transformers_logits_equal_ours(name, tmp_path):
    overrides, arch = CASES[name]
    model = sharp_model(tiny(vocab_size=384, **overrides))
    export_hf(model, tmp_path / "hf", eot_token=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.abs().amax() > 1.0  # logits that carry signal, not a near-zero random model
    assert (ours - theirs).abs().amax().item() < 1e-4


def test_export_hf_cli_writes_safetensors_and_config(tmp_path, capsys):
    save_pretrained(sharp_model(model_preset("tiny")), tmp_path / "final")
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["eos_token_id"] == 100257
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()

"""Parity with the Hugging Face implementations the ecosystem runs."""
import json

import pytest
import torch
from model_helpers import sharp_model, tiny

from gptmini.errors import UserError
from gptmini.hf import export_hf
from gptmini.cli.export_hf import main as export_main
from gptmini.cli.generate import main as generate_main
from gptmini.config import model_preset
from gptmini.generate import generate, sampling_mask
from gptmini.tokenizer import get_tokenizer, train_bpe
from gptmini.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

import transformers

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
    export_hf(model, tmp_path / "hf", get_tokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().amax() > 1.0  # logits that carry signal, not a near-zero random model
    assert (ours - theirs).abs().amax().item() < 1e-4


# Code, accents, CJK, emoji (multi-token characters), digit runs (split every three digits), runs of spaces,
# tabs and newlines, and end-of-text typed as text, which our tokenizer reads as seven ordinary tokens.
VARIED_TEXT = (
    "def f(x):\n\treturn x ** 2  # square\n\n\n    \u00e9t\u00e9 na\u00efve \u4f60\u597d\u4e16\u754c "
    "\U0001f680\U0001f468\u200d\U0001f469\u200d\U0001f467 3333 1234567 \u00a0x\r\n<|endoftext|> after<|fim_prefix|>   \t end"
)


def trained_tokenizer(tmp_path, monkeypatch):
    """A byte-level BPE learned on text like VARIED_TEXT, so its merges cover code, CJK and emoji."""
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(tmp_path / "cache"))
    return train_bpe([VARIED_TEXT * 3, "def g(y):\n\treturn y  # \u4f60\u597d \U0001f680 caf\u00e9\r\n" * 4], 400,
                     tmp_path / "data")


@pytest.mark.parametrize("kind", ["cl100k_base", "trained"])
def test_autotokenizer_ids_equal_ours_and_literal_specials_stay_text(kind, tmp_path, monkeypatch):
    tok = get_tokenizer() if kind == "cl100k_base" else trained_tokenizer(tmp_path, monkeypatch)
    export_hf(sharp_model(tiny(vocab_size=max(384, tok.vocab_size), tokenizer=tok.name)), tmp_path / "hf", tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = tok.encode(VARIED_TEXT)
    assert tok.eot_token not in ours
    assert hf_tok(VARIED_TEXT, add_special_tokens=False)["input_ids"] == ours
    assert hf_tok(VARIED_TEXT)["input_ids"] == [tok.eot_token] + ours  # a prompt starts after end-of-text
    assert hf_tok.decode(ours) == VARIED_TEXT
    assert hf_tok.eos_token_id == tok.eot_token == hf_tok.convert_tokens_to_ids("<|endoftext|>")
    if kind == "trained":  # llama.cpp's converter knows no trained BPE: refused before anything is written
        with pytest.raises(UserError, match=f"not the model's {tok.name} tokenizer"):
            export_hf(sharp_model(tiny(vocab_size=384, tokenizer=tok.name)), tmp_path / "gg", tok, llama_cpp=True)
        assert not (tmp_path / "gg").exists()


GREEDY_CASES = {
    "dense": (dict(num_experts=0), "LlamaForCausalLM"),
    "moe": (dict(), "MixtralForCausalLM"),
    "sliding-window": (dict(num_experts=0, sliding_window=5), "MistralForCausalLM"),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_pipeline_greedy_tokens_equal_gptmini_generate(name, tmp_path, capsys):
    overrides, arch = GREEDY_CASES[name]
    tok, prompt, new = get_tokenizer(), "The capital of France is", 10
    model = sharp_model(model_preset("tiny", **overrides), std=0.1)
    save_pretrained(model, tmp_path / "final")
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(tmp_path / "final"), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", str(new)]) == 0
    cli_text = capsys.readouterr().out
    ids = [tok.eot_token] + tok.encode(prompt)
    ours = generate(model, [ids], new, temperature=0.0, eos_token_id=tok.eot_token,
                    allowed=sampling_mask(tok, model.config.vocab_size, torch.device("cpu")))[0]

    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), dtype=torch.float32)
    assert type(pipe.model).__name__ == arch
    out = pipe(prompt, do_sample=False, max_new_tokens=new, return_tensors=True)[0]["generated_token_ids"]
    theirs = out.tolist() if hasattr(out, "tolist") else list(out)
    assert len(ours) > len(ids) + 3  # a continuation, not an immediate end-of-text
    assert theirs[: len(ours)] == ours
    assert cli_text == prompt + tok.decode([t for t in ours[len(ids):] if t != tok.eot_token]) + "\n"


def test_export_hf_cli_writes_safetensors_and_config(tmp_path, capsys):
    save_pretrained(sharp_model(model_preset("tiny")), tmp_path / "final")
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["eos_token_id"] == 100257
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 100257 and 100256 in generation["suppress_tokens"]
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    # For llama.cpp: tiktoken's own ids, with no end-of-text in front (llama.cpp adds it as the BOS).
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "gg"), "--llama-cpp"]) == 0
    assert "convert_hf_to_gguf.py" in capsys.readouterr().out
    assert json.loads((tmp_path / "gg" / "tokenizer.json").read_text())["post_processor"] is None
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "gg")(VARIED_TEXT, add_special_tokens=False)[
        "input_ids"] == get_tokenizer().encode(VARIED_TEXT)


def test_export_hf_refuses_a_non_empty_folder_and_writes_nothing(tmp_path, capsys):
    save_pretrained(sharp_model(model_preset("tiny")), tmp_path / "final")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "hf")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "hf"]  # no temporary folder left behind
    (tmp_path / "empty").mkdir()
    assert export_main(["--checkpoint", str(tmp_path / "final"), "--out", str(tmp_path / "empty")]) == 0

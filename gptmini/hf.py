"""`gptmini export-hf`: a gptmini model as a Hugging Face folder that transformers, vLLM and chat UIs load
whole: model.safetensors, config.json, tokenizer.json, tokenizer_config.json and generation_config.json.

A model with experts becomes `MixtralForCausalLM`; a dense one `LlamaForCausalLM`, or `MistralForCausalLM`
when it uses a sliding window (Llama has none). The tensors are renamed, never transformed: our RoPE,
RMSNorm, SwiGLU and routing already follow those models, which tests/test_hf.py checks logit for logit.

The tokenizer is transformers' own conversion of the tiktoken encoding (`TikTokenConverter`; a trained
`bpe-*` tokenizer converts the same way, from the ranks of its tokenizer.tiktoken and cl100k's pattern), with
four corrections so that it encodes and decodes exactly as `gptmini.tokenizer` does:
- digit runs split every three digits: the pattern's possessive `\\p{N}{1,3}+` means something else to the
  `tokenizers` regex engine (below);
- special tokens keep their tiktoken ids: the converter appends them after the BPE ranks, which puts
  cl100k's end-of-text at 100256 (a gap in cl100k) instead of 100257;
- a literal `<|endoftext|>` typed in the text is text (`split_special_tokens`), as `encode_ordinary` reads it;
- every prompt starts with end-of-text, as `gptmini generate` and training's document boundaries have it.
"""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptmini.errors import UserError
from gptmini.files import write_atomic, write_dir_atomic, write_json
from gptmini.model import GPTOSSMini, ModelConfig
from gptmini.tokenizer import Tokenizer
from gptmini.parallel import unwrap
from gptmini.weights import model_state


def hf_architecture(config: ModelConfig) -> tuple[str, str]:
    if config.is_moe:
        return "MixtralForCausalLM", "mixtral"
    if config.sliding_window is not None:
        return "MistralForCausalLM", "mistral"
    return "LlamaForCausalLM", "llama"


def hf_config(config: ModelConfig, eot_token: int | None = None) -> dict:
    arch, model_type = hf_architecture(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "ntk":
        rope = {"rope_type": "dynamic", "rope_theta": config.rope_theta, "factor": config.rope_factor}
    hf = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope,
        # transformers 4.x and most serving stacks read these two instead of rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if rope["rope_type"] == "default" else {"type": "dynamic", "factor": config.rope_factor},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "torch_dtype": "float32",
    }
    if model_type != "llama":
        hf["sliding_window"] = config.sliding_window
    if config.is_moe:
        hf |= {
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.top_k,
            "router_aux_loss_coef": config.aux_loss_coef,
            "output_router_logits": False,
        }
    return hf


def hf_state_dict(model: GPTOSSMini) -> dict[str, torch.Tensor]:
    cfg = model.config
    ours = model_state(model)
    out = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["output.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = ours[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "ffn_norm.weight"]
        for ours_name, hf_name in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[dst + f"self_attn.{hf_name}.weight"] = ours[src + f"attention.{ours_name}.weight"]
        if cfg.is_moe:
            # Mixtral's checkpoint layout: one w1/w2/w3 Linear per expert (transformers fuses them on load).
            out[dst + "block_sparse_moe.gate.weight"] = ours[src + "feed_forward.gate.weight"]
            for w in ("w1", "w2", "w3"):
                for e, weight in enumerate(ours[src + f"feed_forward.{w}"].unbind(0)):
                    out[dst + f"block_sparse_moe.experts.{e}.{w}.weight"] = weight.contiguous()
        else:
            for ours_name, hf_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out[dst + f"mlp.{hf_name}.weight"] = ours[src + f"feed_forward.{ours_name}.weight"]
    return out


@functools.lru_cache(maxsize=4)  # ~1 s for cl100k; tests export many models with one tokenizer
def hf_tokenizer_json(tok: Tokenizer, bos_template: bool = True) -> str:
    """transformers' tokenizer.json for `tok`. `bos_template` puts end-of-text before every text, as training's
    document boundaries and `gptmini generate` do. Without it (for llama.cpp) the ids are tiktoken's own: llama.cpp's
    converter recognises cl100k by hashing them (as DBRX's), and adds the BOS itself from tokenizer_config."""
    try:  # transformers is optional (gptmini[hf]); its `tokenizers` dependency comes with it
        from tokenizers import AddedToken, processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as exc:
        raise UserError("export-hf converts the tokenizer with transformers: pip install 'gptmini[hf]'") from exc
    enc = tok.enc

    class Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, _url):  # the ranks are in memory; the file route needs `blobfile`
            return enc._mergeable_ranks

        def extract_vocab_merges_from_model(self, url):
            vocab, merges = super().extract_vocab_merges_from_model(url)
            return vocab | enc._special_tokens, merges  # specials at their tiktoken ids, not appended

    # tiktoken's regex engine reads `{1,3}+` as a possessive interval; Oniguruma, which `tokenizers` runs, reads it
    # as one or more repeats of the interval, which keeps "3333" one piece (two tokens, "33" "33", where tiktoken
    # gives "333" "3"). The interval ends its alternative, so the plain greedy one matches the same text.
    pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", enc._pat_str)
    hf = Converter(pattern=pattern).converted()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in enc._special_tokens])
    if not bos_template:  # and no post-processor at all: llama.cpp's converter then reads add_bos_token
        doc = json.loads(hf.to_str())
        doc["post_processor"] = None
        return json.dumps(doc, ensure_ascii=False)
    eot = enc.decode_single_token_bytes(tok.eot_token).decode()
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{eot} $A", pair=f"{eot} $A {eot} $B",
                                      special_tokens=[(eot, tok.eot_token)]),
    ])
    return hf.to_str()


def hf_tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    eot = tok.enc.decode_single_token_bytes(tok.eot_token).decode()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot, "eos_token": eot, "pad_token": eot,
        "add_bos_token": True,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }


def hf_generation_config(config: ModelConfig, tok: Tokenizer) -> dict:
    # What `sampling_mask` keeps out of our sampling: the vocab padding and the specials other than
    # end-of-text, none of which decode as text. A model trained on our data never ranks them first, but a
    # fine-tuned or barely trained one can, and greedy decoding must then agree with `gptmini generate`.
    suppress = [i for i in range(tok.n_ordinary, config.vocab_size) if i != tok.eot_token]
    return {
        "bos_token_id": tok.eot_token,
        "eos_token_id": tok.eot_token,
        "pad_token_id": tok.eot_token,
        "suppress_tokens": suppress,
        "max_length": config.max_seq_len,
    }


def check_export_target(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"--out {directory} exists and is not an empty folder; name a new folder or remove it first")
    return directory


def export_hf(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Tokenizer, llama_cpp: bool = False) -> Path:
    """Write the folder whole or not at all; an existing non-empty `directory` is refused, never replaced.
    `llama_cpp` writes the tokenizer for llama.cpp's convert_hf_to_gguf.py (`hf_tokenizer_json`'s bos_template off)."""
    directory = check_export_target(directory)
    if llama_cpp and tokenizer.name != "cl100k_base":
        raise UserError(
            f"--llama-cpp: llama.cpp's converter recognises cl100k_base, not the model's {tokenizer.name} tokenizer "
            f"(it refuses a BPE it has no hash for); export without --llama-cpp for transformers or vLLM"
        )
    model = unwrap(model)
    state = hf_state_dict(model)
    config = hf_config(model.config, tokenizer.eot_token)
    return write_dir_atomic(
        directory,
        {
            "model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
            "config.json": lambda p: write_json(p, config),
            "tokenizer.json": lambda p: write_atomic(p, hf_tokenizer_json(tokenizer, bos_template=not llama_cpp)),
            "tokenizer_config.json": lambda p: write_json(p, hf_tokenizer_config(tokenizer, model.config.max_seq_len)),
            "generation_config.json": lambda p: write_json(p, hf_generation_config(model.config, tokenizer)),
        },
    )

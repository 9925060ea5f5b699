"""`gptmini export-hf`: a gptmini model in the Hugging Face layout (model.safetensors + config.json).

A model with experts becomes `MixtralForCausalLM`; a dense one `LlamaForCausalLM`, or `MistralForCausalLM`
when it uses a sliding window (Llama has none). The tensors are renamed, never transformed: our RoPE,
RMSNorm, SwiGLU and routing already follow those models, which tests/test_hf.py checks logit for logit.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptmini.model import GPTOSSMini, ModelConfig
from gptmini.files import write_dir_atomic, write_json
from gptmini.weights import model_state, unwrap


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


def export_hf(model: torch.nn.Module, directory: str | os.PathLike, eot_token: int | None = None) -> Path:
    model = unwrap(model)
    state = hf_state_dict(model)
    config = hf_config(model.config, eot_token)
    return write_dir_atomic(
        directory,
        {
            "model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
            "config.json": lambda p: write_json(p, config),
        },
    )

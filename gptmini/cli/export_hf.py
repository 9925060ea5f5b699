"""`gptmini export-hf`: a checkpoint or registered model as a Hugging Face folder (Llama/Mistral/Mixtral)."""
from __future__ import annotations

import argparse

from gptmini.cli import run
from gptmini.cli.source import add_model_source, load_model_source
from gptmini.hf import export_hf, hf_architecture


def export(args: argparse.Namespace) -> None:
    model, tok = load_model_source(args)
    out = export_hf(model, args.out, tok.eot_token)
    arch, _ = hf_architecture(model.config)
    print(f"wrote {arch} to {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptmini export-hf",
                                description="Export a gptmini model in the Hugging Face layout (safetensors + config.json).")
    add_model_source(p)
    p.add_argument("--out", required=True, help="output folder (replaced whole if it exists)")
    args = p.parse_args(argv)
    return run("gptmini export-hf", lambda: export(args))

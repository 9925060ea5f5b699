"""`gptmini export-hf`: a checkpoint or registered model as a Hugging Face folder (Llama/Mistral/Mixtral),
with its tokenizer and generation config."""
from __future__ import annotations

import argparse

from gptmini.cli import run
from gptmini.cli.source import add_model_source, load_model_source
from gptmini.hf import check_export_target, export_hf, hf_architecture


def export(args: argparse.Namespace) -> None:
    check_export_target(args.out)  # before the minutes a large model takes to load
    model, tok = load_model_source(args)
    out = export_hf(model, args.out, tok, llama_cpp=args.llama_cpp)
    arch, _ = hf_architecture(model.config)
    if args.llama_cpp:
        print(f"wrote {arch} and its tokenizer for llama.cpp to {out} (convert with "
              f"`python convert_hf_to_gguf.py {out} --outfile model.gguf`)")
        return
    print(f"wrote {arch} and its tokenizer to {out} (load with transformers.pipeline('text-generation', model=...) "
          f"or serve with `vllm serve {out}`)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptmini export-hf",
                                description="Export a gptmini model as a Hugging Face folder (weights, config, tokenizer, "
                                            "generation config).")
    add_model_source(p)
    p.add_argument("--out", required=True, help="output folder: new, or empty (a non-empty folder is refused)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="for llama.cpp's convert_hf_to_gguf.py: a tokenizer.json it recognises (cl100k; llama.cpp adds "
                        "the leading end-of-text itself)")
    args = p.parse_args(argv)
    return run("gptmini export-hf", lambda: export(args))

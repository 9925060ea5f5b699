"""vLLM serves what `gptmini export-hf` writes: `python bench/vllm_smoke.py [--out vllm.json]`.

Exports the demo preset (seed 0, MoE, so vLLM's Mixtral path) and its dense twin with `export_hf`, loads each
folder with `vllm.LLM` as `vllm serve FOLDER` would, and decodes greedily from a few prompts: the tokens must
equal `gptmini.generate`'s on the same weights on the same GPU. Without vLLM (it needs a GPU and is not in our
dependencies) it records "skipped" and exits 0, so the GPU campaign runs on where vLLM does not install.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from gptmini.config import model_preset
from gptmini.files import write_json
from gptmini.generate import generate, sampling_mask
from gptmini.hf import export_hf
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer

PROMPTS = ["The Python interpreter", "def fibonacci(n):", "Un café, s'il vous plaît"]


def smoke(overrides: dict, new: int) -> dict:
    from vllm import LLM, SamplingParams

    tok = get_tokenizer()
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset("demo", **overrides)).cuda().eval()
    folder = Path(tempfile.mkdtemp()) / "hf"
    export_hf(model, folder, tok)
    ids = [[tok.eot_token] + tok.encode(p) for p in PROMPTS]
    ours = [generate(model, [row], new, temperature=0.0, eos_token_id=tok.eot_token,
                     allowed=sampling_mask(tok, model.config.vocab_size, torch.device("cuda")))[0][len(row):]
            for row in ids]
    llm = LLM(model=str(folder), dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    t0 = time.perf_counter()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=new))
    elapsed = time.perf_counter() - t0
    theirs = [list(o.outputs[0].token_ids) for o in outs]
    prompt_ids = [list(o.prompt_token_ids) for o in outs]
    return {"architecture": type(model).__name__, "overrides": overrides,
            "prompt_ids_equal": prompt_ids == ids, "tokens_equal": [a == b for a, b in zip(ours, theirs)],
            "tokens_per_s": round(sum(map(len, theirs)) / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the result here as JSON")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        result = {"skipped": "vllm is not installed" if torch.cuda.is_available() else "no CUDA device"}
    else:
        import vllm

        result = {"vllm": vllm.__version__, "torch": torch.__version__,
                  "runs": [smoke(o, args.new_tokens) for o in ({}, {"num_experts": 0})]}
    print(result)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

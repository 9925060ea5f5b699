"""llama.cpp against gptmini on the same model: GGUF conversion time and size, and batch-1 greedy decode.

    make gguf   # llama-cpp-python and llama.cpp's converter (docs/formats.md, "llama.cpp / GGUF")
    .venv/bin/python bench/bench_gguf.py [--preset demo] [--outtypes f32,f16,q8_0] [--new-tokens 64] [--threads 1]

The model is the preset at its random init (seed 0), exported with `gptmini.hf.export_hf` and converted by
llama.cpp's convert_hf_to_gguf.py exactly as tests/test_gguf.py does. Decode follows bench_quantize.py:
a 16-token random prompt, then --new-tokens greedy tokens with a KV cache; tokens/s = new tokens / time of
the whole call (prefill included), best of two after a warm-up. `agree` counts the leading new tokens on which
llama.cpp's greedy choice equals gptmini's fp32 one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from gptmini import quantize
from gptmini.config import model_preset
from gptmini.files import write_json
from gptmini.generate import generate
from gptmini.hf import export_hf
from gptmini.model import GPTOSSMini
from gptmini.tokenizer import get_tokenizer

from common import environment, md_table, seconds


def llama_cpp_greedy(llm, prompt: list[int], new: int) -> list[int]:
    return list(islice(llm.generate(prompt, temp=0.0, reset=True), new))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--outtypes", default="f32,f16,q8_0", type=lambda s: s.split(","))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench_gguf.py: llama-cpp-python is not installed; `make gguf` installs it and llama.cpp's converter")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_gguf import to_gguf  # the conversion the tests check, not a second copy of it

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPTOSSMini(model_preset(args.preset)).eval().requires_grad_(False)
    root = Path(tempfile.mkdtemp())
    export_hf(model, root / "hf", get_tokenizer(model.config.tokenizer), llama_cpp=True)
    quantize.apply(model, "none")  # what `gptmini generate` decodes with: the weights laid out for decoding
    prompt = torch.randint(0, 100_000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    new = args.new_tokens

    def ours() -> list[int]:
        return generate(model, [prompt], new, temperature=0.0)[0][len(prompt):]

    ours()  # warm-up
    reference = ours()
    rows = [{"engine": "gptmini", "dtype": "fp32", "convert_s": None, "file_mib": None,
             "decode_b1_tokens_per_s": round(new / min(seconds(ours, repeats=2)), 1), "agree": new}]
    for outtype in args.outtypes:
        t0 = time.perf_counter()
        gguf = to_gguf(root / "hf", root / f"model-{outtype}.gguf", outtype)
        convert_s = time.perf_counter() - t0
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=model.config.max_seq_len, n_threads=args.threads,
                              verbose=False)
        llama_cpp_greedy(llm, prompt, 4)  # warm-up
        theirs = llama_cpp_greedy(llm, prompt, new)
        tokens_per_s = new / min(seconds(lambda: llama_cpp_greedy(llm, prompt, new), repeats=2))
        agree = next((i for i, (a, b) in enumerate(zip(reference, theirs)) if a != b), len(theirs))
        rows.append({"engine": "llama.cpp", "dtype": outtype, "convert_s": round(convert_s, 1),
                     "file_mib": round(gguf.stat().st_size / 2**20, 1),
                     "decode_b1_tokens_per_s": round(tokens_per_s, 1), "agree": agree})
        del llm
    print(md_table(["engine", "dtype", "convert s", "GGUF MiB", "decode b1 tok/s", "greedy tokens equal"],
                   [[r["engine"], r["dtype"], r["convert_s"] or "-", r["file_mib"] or "-", r["decode_b1_tokens_per_s"],
                     f"{r['agree']}/{new}"] for r in rows], "llrrrr"))
    meta = environment(preset=args.preset, threads=args.threads, new_tokens=new, llama_cpp_python=llama_cpp.__version__)
    print(json.dumps(meta))
    if args.json:
        write_json(args.json, {"rows": rows, **meta})


if __name__ == "__main__":
    main()

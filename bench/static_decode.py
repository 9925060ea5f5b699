"""Static-shape greedy decoding for gptmini models: the route to >= 1,000 tokens/s at batch 1.

    python bench/static_decode.py   # the ops one decode step dispatches, eager and static

Eager decode is launch-bound: run as a script, this counts the ops one decode step dispatches, on CPU for the
seed's structure at tiny widths (the count does not depend on them) on the grouped-expert path. Here the KV
cache, the position and the mask are fixed-size device tensors and the position advances in place, so every
step has the same shapes and addresses: one `torch.compile(mode="reduce-overhead")` graph (fusion + a CUDA
graph) serves every step, and no step reads back to the host. It runs the model's own forward on the library's
KV cache (`at(positions)` mode); greedy only, prompts of one length, no sliding window or RoPE scaling. It stays
in bench/ until its CUDA-graph speed is measured.
"""
from __future__ import annotations

import collections

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from gptmini.config import model_preset
from gptmini.generate import stream
from gptmini.model import GPTOSSMini, KVCache

# Views, reshapes and allocations: dispatched, but they launch no kernel.
NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze",
             "as_strided", "detach", "alias", "permute", "split", "chunk", "unbind", "split_with_sizes", "lift_fresh",
             "_reshape_alias", "reshape", "empty", "empty_strided", "empty_like"}


class StaticDecoder:
    def __init__(self, model: GPTOSSMini, batch: int, max_len: int, compile_mode: str | None = None,
                 backend: str = "inductor"):
        cfg = model.config
        if cfg.sliding_window is not None or cfg.rope_scaling is not None:
            raise ValueError(
                f"static decoding supports neither sliding_window={cfg.sliding_window} nor "
                f"rope_scaling={cfg.rope_scaling!r}; use gptmini.generate.generate for this config"
            )
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}; shorten the prompt or the generation")
        self.model, self.max_len = model.eval(), max_len
        w = model.tok_embeddings.weight
        self.cache = KVCache(cfg, batch, w.device, w.dtype, max_len=max_len)
        if hasattr(torch, "_dynamo"):  # fixed addresses: CUDA graphs may mutate them in place
            torch._dynamo.mark_static_address(self.cache.k)
            torch._dynamo.mark_static_address(self.cache.v)
        self.slots = torch.arange(max_len, device=w.device)  # (S,)
        self.step = self._forward
        if compile_mode and cfg.is_moe and model.tok_embeddings.weight.dtype != torch.bfloat16:
            raise ValueError(
                f"compiling static decoding of an MoE model needs bf16 weights, not "
                f"{model.tok_embeddings.weight.dtype} (torch._grouped_mm compiles for bf16 only): "
                f"model.to(torch.bfloat16) first"
            )
        if compile_mode:
            # One graph needs the grouped expert kernel: the looped one's shapes follow the routing. fullgraph:
            # a graph break would split the step, and the CUDA graph with it, without a word.
            model.set_expert_kernel("grouped")
            self.step = torch.compile(self._forward, mode=compile_mode, fullgraph=True, backend=backend)

    def _forward(self, idx: Tensor, positions: Tensor) -> Tensor:
        """Greedy next token (B,) for idx (B, T) at positions (T,); writes the cache at those positions."""
        self.cache.at(positions)
        logits = self.model.output(self.model.hidden(idx, self.cache)[:, -1])  # (B, V)
        return logits.argmax(dim=-1)

    def generate(self, prompt: Tensor, max_new_tokens: int) -> Tensor:
        """(B, T) prompt → (B, max_new_tokens) greedy tokens."""
        out, position = self.prefill(prompt, max_new_tokens)
        self.decode(out, position)
        return out

    @torch.inference_mode()
    def prefill(self, prompt: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """The prompt's forward (eager: its shape is the prompt's) and the first token; returns the output
        buffer and the next position, a (1,) device tensor."""
        B, T = prompt.shape
        if T + max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_len={self.max_len}")
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt.device)
        out[:, 0] = self._forward(prompt, self.slots[:T])
        return out, self.slots[T : T + 1].clone()

    @torch.inference_mode()
    def decode(self, out: Tensor, position: Tensor) -> None:
        """Fill out[:, 1:] one token per step; the loop never waits on the device."""
        for i in range(1, out.size(1)):
            out[:, i] = self.step(out[:, i - 1 : i], position)
            position += 1


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (name := func.overloadpacket.__name__) not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    cfg = model_preset("seed", d_model=96, n_heads=12, n_kv_heads=3, d_ff=64, vocab_size=512, dropout=0.0)
    torch.manual_seed(0)
    model = GPTOSSMini(cfg).eval()
    model.set_expert_kernel("grouped")  # the H100 bf16 path (torch._grouped_mm runs on CPU too)
    prompt = torch.randint(0, 512, (1, 16))
    tokens = stream(model, prompt, max_new_tokens=4, temperature=0.0)
    with torch.inference_mode():
        next(tokens)  # the prefill
        next(tokens)
        with CountOps() as eager:
            next(tokens)
    print("gptmini.generate.stream, one decode step (seed structure, grouped path):", eager.ops.total(),
          "dispatched ops (some launch nothing: same-dtype to, eval dropout, flatten);",
          eager.ops.total() / cfg.n_layers, "per layer")
    print(eager.ops.most_common(25))
    decoder = StaticDecoder(model, 1, 32)
    out, position = decoder.prefill(prompt, 4)
    with torch.inference_mode(), CountOps() as static:
        out[:, 1] = decoder.step(out[:, 0:1], position)
    print("static decoder, one step:", static.ops.total())


if __name__ == "__main__":
    main()

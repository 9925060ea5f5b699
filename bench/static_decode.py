"""Static-shape greedy decoding for gptmini models: the route to >= 1,000 tokens/s at batch 1.

Eager decode is launch-bound (about a thousand dispatched ops, some 700 of them kernels, per token for
the seed model: bench/count_decode_ops.py). Here the KV cache, the position and the mask are fixed-size
device tensors, and the position advances in place, so every step has the same shapes and the same tensor
addresses: one `torch.compile(mode="reduce-overhead")` graph (fusion + a CUDA graph) serves every step,
and no step reads anything back to the host.

It runs the model's own forward (`GPTOSSMini.hidden`) on the library's one KV cache, in its `at(positions)`
mode: every row writes at positions held on the device, so the arithmetic is the model's. It stays in bench/
until its CUDA-graph speed is measured (BENCHMARKS.md): greedy only, prompts of one length, no sliding window
and no RoPE scaling (the seed config's case). tests/test_static_decode.py checks it token for token against
`gptmini.generate` on CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gptmini.model import GPTOSSMini, KVCache


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

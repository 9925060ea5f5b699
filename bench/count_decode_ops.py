"""Count the ops one eager decode step dispatches (seed structure: 12 layers, 8 experts top-2, GQA 12/3;
tiny widths, since the count does not depend on them), on the H100's grouped-expert path. CPU only:
the evidence behind BENCHMARKS.md's "decode is launch-bound" account. `python bench/count_decode_ops.py`
"""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptmini.config import model_preset
from gptmini.generate import stream
from gptmini.model import GPTOSSMini

from static_decode import StaticDecoder

# Views, reshapes and allocations: dispatched, but they launch no kernel.
NO_KERNEL = {"view", "_unsafe_view", "transpose", "t", "expand", "slice", "select", "unsqueeze", "squeeze", "as_strided",
             "detach", "alias", "permute", "split", "chunk", "unbind", "split_with_sizes", "lift_fresh", "_reshape_alias",
             "reshape", "empty", "empty_strided", "empty_like"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.c = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.c[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    cfg = model_preset("seed", d_model=96, n_heads=12, n_kv_heads=3, d_ff=64, vocab_size=512, dropout=0.0)
    torch.manual_seed(0)
    model = GPTOSSMini(cfg).eval()
    model.set_expert_kernel("grouped")  # the H100 bf16 path (torch._grouped_mm runs on CPU too)
    prompt = torch.randint(0, 512, (1, 16))
    it = stream(model, prompt, max_new_tokens=4, temperature=0.0)
    with torch.inference_mode():
        next(it)
        next(it)
        with Count() as c:
            next(it)
    print("gptmini.generate.stream, one decode step (seed structure, grouped path):", sum(c.c.values()),
          "dispatched ops (some launch nothing: same-dtype to, eval dropout, flatten);",
          sum(c.c.values()) / cfg.n_layers, "per layer")
    print(c.c.most_common(25))
    dec = StaticDecoder(model, 1, 32)
    out, pos = dec.prefill(prompt, 4)
    with torch.inference_mode():
        with Count() as c2:
            out[:, 1] = dec.step(out[:, 0:1], pos)
    print("static decoder, one step:", sum(c2.c.values()))


if __name__ == "__main__":
    main()

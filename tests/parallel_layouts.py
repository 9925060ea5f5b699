"""Every layout of the device mesh against one process, in one torchrun launch (tests/test_parallel.py).

    torchrun --standalone --nproc-per-node 2 tests/parallel_layouts.py OUT_DIR   # ddp2 fsdp2 tp2 ep2 tp2-moe ...
    torchrun --standalone --nproc-per-node 4 tests/parallel_layouts.py OUT_DIR   # fsdp2xtp2 ep2xtp2 ddp2xep2 ...
    torchrun --standalone --nproc-per-node 8 tests/parallel_layouts.py OUT_DIR   # ddp2xfsdp2xep2 fsdp2xep4
    torchrun --standalone --nproc-per-node 4 tests/parallel_layouts.py OUT_DIR fsdp2xep2   # named layouts only

Each layout trains a tiny dense or MoE model in float64, from the same init, on the same global batches,
with the trainer's own `train_step` (accumulation, expert-gradient sync, clipping, AdamW) and
`parallel.wrap` on a mesh from `parallel.build_mesh`; rank 0 writes each layout's per-step losses and
grad norms, its collectives per step (CommDebugMode) and its bytes moved per step to OUT_DIR/layouts-N.json.
The tp2, ep2 and tp2-moe layouts also write a training checkpoint after step 2 (`checkpoint.save_checkpoint`),
which the test resumes in one process. `one_process` is the reference, run by the test itself.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gptmini import checkpoint, parallel
from gptmini.config import OptimConfig
from gptmini.parallel import MeshDims
from gptmini.model import GPTOSSMini, ModelConfig
from gptmini.optim import build_optimizer
from gptmini.trainer import TrainState, train_step

STEPS, ACCUM, ROWS, T = 3, 2, 8, 16  # optimizer steps, micro-batches per step, windows per micro-batch, tokens
CKPT_STEP = 2
MODELS = {
    "dense": ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                         num_experts=0, max_seq_len=T, dropout=0.0),
    # aux_loss_coef 0.1: the balance loss must weigh enough that a per-rank (not global) one would show.
    "moe": ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32,
                       num_experts=4, top_k=2, max_seq_len=T, dropout=0.0, aux_loss_coef=0.1),
}
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5)  # a clip that bites: the norm is ~1
LAYOUTS = {
    2: {"ddp2": ("dense", MeshDims(dp_replicate=2)), "fsdp2": ("dense", MeshDims(dp_shard=2)),
        "tp2": ("dense", MeshDims(tp=2)), "ddp2-moe": ("moe", MeshDims(dp_replicate=2)),
        "fsdp2-moe": ("moe", MeshDims(dp_shard=2)), "ep2": ("moe", MeshDims(ep=2)),
        "tp2-moe": ("moe", MeshDims(tp=2))},
    4: {"fsdp2xtp2": ("dense", MeshDims(dp_shard=2, tp=2)), "fsdp2xep2": ("moe", MeshDims(dp_shard=2, ep=2)),
        "ep2xtp2": ("moe", MeshDims(ep=2, tp=2)), "ddp2xep2": ("moe", MeshDims(dp_replicate=2, ep=2)),
        "fsdp2xtp2-moe": ("moe", MeshDims(dp_shard=2, tp=2)), "ep2xtp2-bf16": ("moe", MeshDims(ep=2, tp=2)),
        "fsdp2xep2-bf16": ("moe", MeshDims(dp_shard=2, ep=2))},
    8: {"ddp2xfsdp2xep2": ("moe", MeshDims(dp_replicate=2, dp_shard=2, ep=2)),
        "fsdp2xep4": ("moe", MeshDims(dp_shard=2, ep=4))},
}
# Compiled as `--compile` compiles (each block, before wrapping), with the backend named: dynamo traces the TP
# plan, the MoE's sequence layouts and its experts split by tp, and AOTAutograd takes the graphs (aot_eager;
# without FSDP, whose hooks hand the blocks plain inputs, TP's embedding output enters the first block as a
# pending collective: parallel._settle_collective); inductor also generates C++ for them (it needs a C++
# compiler), with EP's dispatch and combine left eager between them. The losses must still be one process's.
COMPILED = {"tp2-moe": "aot_eager", "ep2xtp2": "inductor"}
# bf16 autocast over fp32 weights, as `--train.precision bf16` trains (on a CPU with bf16 units, or CUDA),
# against one process in bf16 too (FSDP then reduces the experts' gradients in fp32, where float64 takes another
# path); every other layout is float64 without autocast.
PRECISION = {"ep2xtp2-bf16": "bf16", "fsdp2xep2-bf16": "bf16"}
CHECKPOINTED = ("tp2", "ep2", "tp2-moe", "fsdp2xep2", "fsdp2xep4")  # a training checkpoint after step CKPT_STEP


def batches(model: str) -> torch.Tensor:
    """(STEPS, ACCUM, ROWS, T + 1) token windows: micro-batch m of a step is ROWS windows, of which data rank r
    of R takes rows r*ROWS/R onwards, so every layout's micro-batch m is one process's micro-batch m."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, MODELS[model].vocab_size, (STEPS, ACCUM, ROWS, T + 1), generator=g)


class Batches:
    """The trainer's loader, for one data rank of `data`."""

    def __init__(self, windows: torch.Tensor, rank: int, data: int):
        rows = ROWS // data
        self.micro = [w[rank * rows:(rank + 1) * rows] for step in windows for w in step]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.micro.pop(0)
        return w[:, :-1], w[:, 1:]


def build(model: str, precision: str = "fp32") -> GPTOSSMini:
    torch.manual_seed(0)
    net = GPTOSSMini(MODELS[model])
    return net.float() if precision == "bf16" else net.double()  # autocast leaves float64 alone


def run_for(model: str, env: parallel.DistEnv, net: torch.nn.Module, precision: str = "fp32") -> SimpleNamespace:
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=ACCUM), optim=OPTIM)
    return SimpleNamespace(cfg=cfg, env=env, model=net, raw_model=parallel.unwrap(net),
                           optimizer=build_optimizer(net, OPTIM),
                           train_loader=Batches(batches(model), env.data_rank, env.data_world),
                           state=TrainState(), precision=precision)


def step(run: SimpleNamespace) -> tuple[float, float]:
    loss, norm = train_step(run, OPTIM.lr)
    parallel.all_reduce(loss, env=run.env if run.env.mesh is not None else None)
    return loss.item() / run.env.data_world, float(parallel.local(norm))


def one_process(model: str, precision: str = "fp32") -> dict[str, list[float]]:
    """The reference: the whole batch in this process, no process group."""
    run = run_for(model, parallel.DistEnv(0, 0, 1, torch.device("cpu")), build(model, precision), precision)
    losses, norms = zip(*(step(run) for _ in range(STEPS)))
    return {"loss": list(losses), "grad_norm": list(norms)}


def comm_counts(mode) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items() if n}


class _NoModules:
    """CommDebugMode's per-module tracker trips over the hooks FSDP and DDP add (an empty parent list in a
    forward hook); the counts per collective need none of it."""

    name, is_bw, activation_checkpointing = "Global", False, False
    module_parents_dict = {"Global": []}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def collectives():
    """CommDebugMode, also summing per kind the bytes of each collective's first tensor argument (`payload`: a
    c10d op's output buffer, a functional collective's input)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.debug._comm_mode import c10d_collective_ops

    class Mode(CommDebugMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            packet = getattr(func, "_overloadpacket", None)
            if packet is not None and (packet in self.comm_registry or packet in c10d_collective_ops) \
                    and not any(t.__name__ == "DTensor" for t in types):
                tensors = [a for a in torch.utils._pytree.tree_leaves(args[:1]) if isinstance(a, torch.Tensor)]
                key = str(packet).split(".")[-1]
                self.payload[key] = self.payload.get(key, 0) + sum(t.numel() * t.element_size() for t in tensors)
            return super().__torch_dispatch__(func, types, args, kwargs)

    mode = Mode()
    mode.advanced_module_tracker = _NoModules()
    mode.payload = {}
    return mode


def layout(name: str, model: str, dims: MeshDims, out: Path) -> dict:
    t0 = time.perf_counter()
    rank = int(os.environ["RANK"])
    device = torch.device("cpu")
    env = parallel.DistEnv(rank, rank, dims.world, device, dims, parallel.build_mesh(dims, device))
    precision = PRECISION.get(name, "fp32")
    net = build(model, precision)
    torch._dynamo.utils.counters.clear()
    if name in COMPILED:
        torch._dynamo.reset()  # a layout compiled before would count against this one's recompile limit
        parallel.compile_model(net, "blocks", backend=COMPILED[name])
    net = parallel.wrap(net, "ddp" if dims.dp_replicate > 1 else "fsdp", env)
    run = run_for(model, env, net, precision)
    losses, norms = [], []
    for i in range(STEPS):
        # The last step's collectives are counted: dynamo compiles nothing while a dispatch mode (CommDebugMode)
        # is on, so a compiled layout compiles its blocks in the steps before.
        with collectives() if i == STEPS - 1 else contextlib.nullcontext() as mode:
            loss, norm = step(run)
        losses.append(loss)
        norms.append(norm)
        if run.state.step == CKPT_STEP and name in CHECKPOINTED:
            checkpoint.save_checkpoint(out / name, run.state.step, net, run.optimizer, trainer_state={},
                                       rank_state={}, config_json="{}", config_toml="", env=env, keep_last=1)
    result = {"model": model, "precision": precision, "mesh": dims.describe(), "loss": losses, "grad_norm": norms,
              "collectives": comm_counts(mode), "payload_bytes": mode.payload, "seconds": time.perf_counter() - t0,
              "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}
    if model == "moe":
        # The share of every expert weight this rank holds between steps (FSDP's shard of its ep/tp shard).
        experts = parallel.expert_params(run.model)
        result["expert_share"] = (sum(parallel.local(w).numel() for w in experts)
                                  / sum(w.numel() for w in experts))
    if dims.tp > 1:
        # Sequence parallelism leaves the norms' gradients partial on each rank, and the replicated router sums
        # its gradient from partial expert outputs; after the steps their weights must still be the same on
        # every tp rank.
        block = run.model.layers[0]
        replicas = [block.attention_norm.weight] + ([block.feed_forward.gate.weight] if model == "moe" else [])
        agree = True
        for w in replicas:
            w = parallel.local(w).detach().clone()
            gathered = [torch.empty_like(w) for _ in range(dims.tp)]
            torch.distributed.all_gather(gathered, w, group=env.mesh["tp"].get_group())
            agree &= all(torch.equal(gathered[0], g) for g in gathered)
        result["replicas_agree"] = agree
    return result


def main() -> None:
    names = sorted({name for layouts in LAYOUTS.values() for name in layouts})
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N tests/parallel_layouts.py",
                                description="Every layout of N ranks against one process (N: 2, 4 or 8).")
    p.add_argument("out", type=Path, help="where layouts-N.json (and the layouts' checkpoints) go")
    p.add_argument("only", nargs="*", metavar="LAYOUT", help=f"run only these (default: all of N's): {', '.join(names)}")
    args = p.parse_args()
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        p.error(f"no layout {', '.join(unknown)}: choose from {', '.join(names)}")
    out, only = args.out, args.only
    out.mkdir(parents=True, exist_ok=True)
    torch.distributed.init_process_group("gloo")
    world = torch.distributed.get_world_size()
    results = {name: layout(name, model, dims, out) for name, (model, dims) in LAYOUTS[world].items()
               if not only or name in only}
    if torch.distributed.get_rank() == 0:
        (out / f"layouts-{world}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

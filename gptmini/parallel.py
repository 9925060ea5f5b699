"""Process groups, the device mesh and model wrapping: DDP, FSDP2, tensor + sequence parallelism (TP) and
expert parallelism (EP), composed on one mesh (docs/scaling.md).

The model never imports torch.distributed; this file wraps an already-built model (as gpt-fast and
torchtitan do). torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) decides whether we are
distributed, so `gptmini train` and `torchrun -m gptmini.train` run the same code; multi-node is
torchrun's rendezvous and nothing of ours.

The mesh is (dp_replicate, dp_shard, ep, tp), outermost first, so tp's ranks are neighbours (one node)
and FSDP's reduce-scatters cross the nodes. `wrap` applies, in torchtitan's order: TP on each block's
projections (then the root), EP on the experts, then `fully_shard` per block and on the root over the data
ranks, or DDP when only replicas are asked for.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gptmini.device import pick_device
from gptmini.errors import UserError
from gptmini.model import GPTOSSMini, ModelConfig, MoE


@dataclass(frozen=True)
class MeshDims:
    """The degrees of the device mesh, outermost first: DDP replicas, FSDP shards, expert and tensor parallel.
    Ranks that differ in dp_replicate, dp_shard or ep read different batches; tp ranks read the same one."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1
    tp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep * self.tp

    @property
    def data(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep

    def describe(self) -> str:
        parts = [f"{name} {n}" for name, n in (("ddp", self.dp_replicate), ("fsdp", self.dp_shard),
                                               ("ep", self.ep), ("tp", self.tp)) if n > 1]
        return " x ".join(parts) or "one process"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_dims(world: int, parallel: str, dp_shard: int, tp: int, ep: int, model: ModelConfig) -> MeshDims:
    """The mesh for `world` ranks, or one UserError that names the value and the degrees that would work.
    A pure function of the train.* degrees: `gptmini train`, `gptmini launch slurm` and the flow check a layout
    before any rank starts."""
    shard = dp_shard
    for name, value, low in (("train.tp", tp, 1), ("train.ep", ep, 1), ("train.dp_shard", shard, 0)):
        if not isinstance(value, int) or value < low:
            raise UserError(f"{name} = {value!r}; it must be an integer >= {low}")
    if tp > 1:
        # d_ff is the dense SwiGLU's hidden size, or each expert's: tp splits it either way.
        sizes = {"model.n_heads": model.n_heads, "model.n_kv_heads": model.n_kv_heads, "model.d_ff": model.d_ff,
                 "model.vocab_size": model.vocab_size}
        bad = [f"{k} = {v}" for k, v in sizes.items() if v % tp]
        if bad:
            good = [d for d in _divisors(world) if all(v % d == 0 for v in sizes.values())]
            raise UserError(f"train.tp = {tp} does not split {', '.join(bad)} evenly; tp must divide n_heads, "
                        f"n_kv_heads, d_ff and vocab_size: use tp in {good} (or change the model)")
    if ep > 1:
        if not model.is_moe:
            raise UserError(f"train.ep = {ep} needs an MoE model (model.num_experts = {model.num_experts}); "
                        f"use ep 1, or --dp-shard/--tp for a dense model")
        if model.num_experts % ep:
            good = [d for d in _divisors(world) if model.num_experts % d == 0]
            raise UserError(f"train.ep = {ep} does not divide model.num_experts = {model.num_experts}; "
                        f"use ep in {good}")
    if world % (tp * ep):
        raise UserError(f"train.tp x train.ep = {tp} x {ep} = {tp * ep} does not divide the world size {world}; "
                          f"pick degrees whose product divides {world} (divisors: {_divisors(world)})")
    rest = world // (tp * ep)  # the data-parallel ranks besides ep
    if shard == 0:
        shard = rest if parallel == "fsdp" else 1
    if rest % shard:
        good = _divisors(rest)
        raise UserError(f"train.dp_shard = {shard} does not divide the {rest} data-parallel rank(s) left by "
                          f"{world} ranks / (tp {tp} x ep {ep}); use dp_shard in {good}")
    replicate = rest // shard
    if replicate > 1 and parallel == "none":
        raise UserError(
            f"--parallel none with {world} ranks: dp_shard x tp x ep = {shard} x {tp} x {ep} = {shard * tp * ep} "
            f"leaves {replicate} copies that would each train alone; use --parallel ddp or fsdp, or degrees whose "
            f"product is {world} (e.g. --dp-shard {rest})"
        )
    return MeshDims(dp_replicate=replicate, dp_shard=shard, ep=ep, tp=tp)


def unwrap(model: torch.nn.Module) -> GPTOSSMini:
    """The GPTOSSMini inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while not isinstance(model, GPTOSSMini):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def mesh_args(spec: str) -> list[str]:
    """The `gptmini train` flags of a layout written in one string (the flow's `parallel` parameter): `none`,
    `ddp`, `fsdp`, or parts joined by `+`, e.g. `fsdp+tp:2` (FSDP over what tp leaves), `fsdp:2+ep:2`,
    `ddp+tp:4`."""
    mode, flags = "none", []
    for part in spec.split("+"):
        name, _, n = part.strip().partition(":")
        if name in ("none", "ddp", "fsdp") and (not n or name == "fsdp") and (not n or n.isdigit()):
            mode = name
            flags += ["--dp-shard", n] if n else []
        elif name in ("tp", "ep") and n.isdigit():
            flags += [f"--{name}", n]
        else:
            raise UserError(f"parallel = {spec!r}: {part!r} is not a layout part; write none, ddp or fsdp, optionally "
                            f"joined by '+' with fsdp:N, tp:N or ep:N (e.g. 'fsdp+tp:2', 'fsdp+ep:2')")
    return ["--parallel", mode, *flags]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dims: MeshDims = MeshDims()
    mesh: dict[str, Any] | None = None  # build_mesh's named DeviceMeshes, None in a single process

    @property
    def data_rank(self) -> int:
        """This rank's index among the ranks that read different batches (tp ranks share one)."""
        return self.rank // self.dims.tp

    @property
    def data_world(self) -> int:
        return self.dims.data

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(cfg: Any) -> DistEnv:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) and build the mesh, or run as a single
    process. The mesh is checked first (`config.mesh_dims`), so a layout that cannot split fails at once.

    `--parallel ddp|fsdp` without torchrun gets a one-rank group, so the wrapping code runs the same.
    """
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    t = cfg.train
    dims = mesh_dims(world, t.parallel, t.dp_shard, t.tp, t.ep, cfg.model)
    device = pick_device(cfg.train.device, local_rank)
    if under_torchrun or cfg.train.parallel != "none":
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)  # generous: rank 0 writes plots/checkpoints alone
        if under_torchrun:
            # torchrun keeps one store across its --max-restarts rounds: a restarted group read the gloo
            # addresses the previous round left there and dialled a dead rank's port (or waited for ever).
            # A prefix per round keeps each round's keys apart.
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    mesh = build_mesh(dims, device) if dist.is_initialized() else None
    return DistEnv(rank, local_rank, world, device, dims, mesh)


MESH_DIMS = ("dp_replicate", "dp_shard", "ep", "tp")


def build_mesh(dims: MeshDims, device: torch.device) -> dict[str, Any]:
    """The one place the mesh is made: its four dimensions by name, and the flattened views `fsdp` (dp_shard x
    ep: what FSDP shards the dense weights over; EP borrows its ranks for data, as in torchtitan), `data`
    (every rank with its own batch), `expert_dp` (dp_replicate x dp_shard: the copies of one expert shard)
    and, with replicas, `hsdp` (dp_replicate x fsdp) and `expert_hsdp` (dp_replicate x dp_shard, 2-D: the
    experts' HSDP mesh); `experts`, what the experts' weights are sharded over:
    ep (the expert index), tp (each expert's hidden units), or both. Kept here rather than sliced again from
    the root mesh, which torch is deprecating for flattened dimensions."""
    from torch.distributed.device_mesh import init_device_mesh

    root = init_device_mesh(device.type, (dims.dp_replicate, dims.dp_shard, dims.ep, dims.tp),
                            mesh_dim_names=MESH_DIMS)
    meshes = {name: root[name] for name in MESH_DIMS}
    meshes["experts"] = root["ep", "tp"] if dims.ep > 1 and dims.tp > 1 else root["tp" if dims.tp > 1 else "ep"]
    meshes["fsdp"] = root["dp_shard", "ep"]._flatten("fsdp")
    meshes["data"] = root["dp_replicate", "dp_shard", "ep"]._flatten("data")
    meshes["expert_dp"] = root["dp_replicate", "dp_shard"]._flatten("expert_dp")
    if dims.dp_replicate > 1 and fully_sharded(dims):  # not for plain DDP, which would only see torch's warning
        meshes["hsdp"] = root["dp_replicate", "fsdp"]  # a 2-D mesh has to be sliced from the root
        meshes["expert_hsdp"] = root["dp_replicate", "dp_shard"]
    return meshes


def fully_sharded(dims: MeshDims) -> bool:
    """FSDP wraps the model: weights sharded over dp_shard x ep, or TP's DTensors with replicas (HSDP)."""
    return dims.dp_shard * dims.ep > 1 or (dims.dp_replicate > 1 and dims.tp > 1)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum", env: DistEnv | None = None) -> torch.Tensor:
    """In place; a no-op in a single process. With `env`, over its data ranks only: tp ranks hold the same
    batch, so a sum over every rank would count it tp times."""
    if dist.is_available() and dist.is_initialized():
        group = env.mesh["data"].get_group() if env is not None and env.mesh is not None else None
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=group)
    return t


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: FSDP's units, and what torch.compile compiles one by one."""
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no `Block` modules to shard; FSDP needs per-block units")
    return blocks


def compile_model(model: nn.Module, how: str = "blocks", mode: str = "default", backend: str = "inductor") -> nn.Module:
    """torch.compile before wrapping (torchtitan's order). `blocks` compiles each block on its own (regional
    compilation: identical blocks share one graph, so compile time stops growing with depth, and FSDP's hooks
    stay outside the graphs); `model` compiles the whole forward, head included; `off` does nothing."""
    kwargs = {"backend": backend} | ({} if mode == "default" else {"mode": mode})
    if how == "model":
        return torch.compile(model, **kwargs)
    if how == "blocks":
        for block in transformer_blocks(model):
            block.compile(**kwargs)
    return model


def wrap(model: nn.Module, parallel: str, env: DistEnv) -> nn.Module:
    """Apply the mesh's parallelisms to a built model (the same init on every rank), in place where FSDP
    and DTensor allow; returns what runs forward and backward."""
    dims = env.dims
    if dims.tp > 1:
        apply_tp(model, env.mesh["tp"])
    if dims.ep * dims.tp > 1 and expert_params(model):
        apply_ep(model, env.mesh["experts"])
    if dims.data > 1:
        set_data_mean(model, env.mesh["data"].get_group())
    # bf16 compute with fp32 gradient reduction on GPU; CPU/gloo keeps fp32 throughout.
    if fully_sharded(dims):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if env.device.type == "cuda" else MixedPrecisionPolicy())
        mesh = env.mesh["hsdp" if dims.dp_replicate > 1 else "fsdp"]
        experts = set(expert_params(model)) if dims.ep * dims.tp > 1 else set()
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=experts & set(block.parameters()) or None)
            if experts_sharded(dims):
                shard_experts(block, env, mp)
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=experts or None)
    elif dims.dp_replicate > 1 or (parallel == "ddp" and env.world_size == 1):  # one rank: the DDP code path
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    elif parallel == "fsdp" and env.world_size == 1:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):  # one rank: the FSDP code path, sharded over one
            fully_shard(block)
        fully_shard(model)
    return model


def apply_tp(model: nn.Module, tp_mesh: Any) -> None:
    """Megatron-style tensor parallelism with sequence parallelism (Korthikanti et al., 2022), torchtitan's
    plan: the residual stream is sharded over the sequence (Shard(1)) between the blocks and the norms run on
    their shard; attention and feed-forward gather the sequence, split their heads / hidden units column-wise
    and reduce-scatter back out of the row-wise wo / w2. The output layer leaves its logits sharded over the
    vocabulary for loss_parallel."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    seq_to_full = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                     desired_input_layouts=(Replicate(), None, None, None, None))
    for block in transformer_blocks(model):
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": seq_to_full,
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(block.feed_forward, MoE):  # its experts are sharded by apply_ep
            moe_sequence_layouts(block.feed_forward, tp_mesh)
        else:
            plan |= {
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
                "feed_forward.w3": ColwiseParallel(),
            }
        parallelize_module(block, tp_mesh, plan)
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    if model.config.tie_embeddings:
        # Both plans shard the table over the vocabulary (dim 0), so one DTensor serves both; parallelize_module
        # made two, which would train apart.
        model.output.weight = model.tok_embeddings.weight
    model.tok_embeddings.register_forward_hook(_settle_collective)
    model.vocab_parallel = True


def _settle_collective(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The embedding's output is its reduce-scatter's pending result (an AsyncCollectiveTensor). Passed as such
    into a block compiled with AOTAutograd (the aot_eager and inductor backends), its gradient comes back a plain
    tensor where the reduce-scatter's backward expects a DTensor, and backward fails ("'Tensor' object has no
    attribute '_local_tensor'", torch 2.13, whose AOTAutograd does not unwrap such inputs). A copy is a plain
    tensor with the same autograd history; it costs one sequence shard of activations per forward."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.clone() if isinstance(out, AsyncCollectiveTensor) else out


def moe_sequence_layouts(moe: MoE, tp_mesh: Any) -> None:
    """An MoE under TP, as the dense feed-forward: its input gathered over the sequence (every tp rank routes
    every token: the router is replicated, as torchtitan's), its output, which each rank computes from its
    share of every expert's hidden units (apply_ep), a partial sum reduce-scattered back over the sequence.
    The input's gradient is partial too (ExpertParallel.router_input), so the gather's backward is a
    reduce-scatter. The MoE itself runs on plain local tensors."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    def gather(module: nn.Module, args: tuple) -> tuple:
        return (args[0].redistribute(tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()]), *args[1:])

    def scatter(module: nn.Module, args: tuple, out: tuple) -> tuple:
        y, aux, load = out
        y = DTensor.from_local(y, tp_mesh, [Partial()], run_check=False).redistribute(tp_mesh, [Shard(1)])
        # The residual stream is local, as the row-wise wo/w2 leave it; the balance loss, the same on every tp
        # rank, joins the loss_parallel loss (a replicated DTensor) as one.
        return y.to_local(), DTensor.from_local(aux, tp_mesh, [Replicate()], run_check=False), load

    moe.register_forward_pre_hook(gather)
    moe.register_forward_hook(scatter)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value on this rank (a replicated loss), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank, a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP, TP or EP): its full weights need a collective gather."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def loss_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """torch's loss_parallel around forward and backward when the logits are vocab-sharded: cross-entropy
    then reduces the logsumexp over the tp ranks instead of gathering the logits."""
    if getattr(model, "vocab_parallel", False):
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return contextlib.nullcontext()


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    return [w for m in model.modules() if isinstance(m, MoE) for w in (m.w1, m.w2, m.w3)]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class ExpertParallel:
    """MoE.expert_parallel: the experts sharded over ep ranks on dim 0, as torchtitan's ExpertParallel (rank r
    holds experts r*E/ep ... (r+1)*E/ep - 1), over tp ranks on each expert's hidden units (w1/w3 dim 1, w2 dim 2),
    as its TensorParallel for experts, or both. Under ep the routing slots, sorted by expert, go to their
    experts' ranks by an all-to-all (uneven splits, with autograd), after the per-expert counts are exchanged and
    read on the host; combine is the same exchange backwards. Under tp every rank computes every slot with its
    share of the hidden units: the MoE's output is a partial sum (moe_sequence_layouts)."""

    def __init__(self, group: Any, ep: int, tp_mesh: Any = None):
        self.group, self.ep, self.tp_mesh = group, ep, tp_mesh
        # Eager under torch.compile, as torchtitan leaves them: the split sizes are read on the host, so dynamo
        # would break its graph there anyway and recompile for every new set of sizes. Wrapped here, not with a
        # decorator: torch.compiler.disable imports dynamo (seconds), which no run without EP needs.
        self.dispatch = torch.compiler.disable(self._dispatch)
        self.combine = torch.compiler.disable(self._combine)

    def local(self, w: torch.Tensor) -> torch.Tensor:
        return w.to_local()  # apply_ep made every expert weight a DTensor (hasattr would not trace under dynamo)

    def router_input(self, x: torch.Tensor) -> torch.Tensor:
        """Every tp rank routes the same tokens, so the router's share of the input gradient is whole on each,
        where the experts' share is partial: 1/tp of it on each rank makes the sum over tp (the gather's
        backward) count it once. The router's own weight gradient is left whole."""
        return x if self.tp_mesh is None else _ScaleGrad.apply(x, 1 / self.tp_mesh.size())

    def routing_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Each tp rank's expert outputs are partial sums, and so is the routing weights' gradient (output
        gradient x expert output): summed over tp in backward, the router's gradient is whole and identical on
        every tp rank, so its weights stay in step without a collective of their own."""
        if self.tp_mesh is None:
            return weights
        from torch.distributed.tensor import DTensor, Partial, Replicate

        return DTensor.from_local(weights, self.tp_mesh, [Replicate()], run_check=False).to_local(
            grad_placements=[Partial()])

    def _dispatch(self, xs: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        if self.group is None:  # experts split over tp alone: every rank holds every expert
            return xs, counts, None
        E = counts.numel()
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)  # [source rank][local expert]
        received = received.view(self.ep, E // self.ep)  # (ep, E_local)
        send = counts.view(self.ep, E // self.ep).sum(1).tolist()
        recv = received.sum(1).tolist()
        ys = all_to_all_single_autograd(xs, recv, send, self.group)  # (M, D) by source rank, then local expert
        # Regroup by local expert (then source rank), the order the expert kernels take.
        starts = torch.cat([received.new_zeros(1), received.flatten().cumsum(0)[:-1]]).view_as(received)
        order = torch.cat([torch.arange(s, s + n) for s, n in zip(starts.T.flatten().tolist(),
                                                                 received.T.flatten().tolist())]
                          + [torch.zeros(0, dtype=torch.long)]).to(xs.device)
        return ys[order], received.sum(0), (order, send, recv)

    def _combine(self, ys: torch.Tensor, route: tuple | None) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        if route is None:
            return ys
        order, send, recv = route
        back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return all_to_all_single_autograd(ys[back], send, recv, self.group)


def apply_ep(model: nn.Module, mesh: Any) -> None:
    """Shard each MoE's experts over `mesh` (build_mesh's `experts`: ep, tp or the 2-D ep x tp) as DTensors, so
    checkpoints hold the full expert set and reshard to any mesh, and route its tokens through ExpertParallel.
    The block's FSDP unit leaves the experts out (ignored_params): with dp_shard copies of each shard, FSDP
    shards them in a unit of their own (`shard_experts`); else `sync_expert_grads` reduces their gradients over
    the DDP replicas."""
    from torch.distributed.tensor import DTensor, Shard

    names = mesh.mesh_dim_names
    ep = mesh.shape[names.index("ep")] if "ep" in names else 1
    dispatcher = ExpertParallel(mesh.get_group("ep") if "ep" in names else None, ep,
                                (mesh["tp"] if len(names) > 1 else mesh) if "tp" in names else None)
    for m in model.modules():
        if isinstance(m, MoE):
            for name, hidden in (("w1", 1), ("w2", 2), ("w3", 1)):
                local = getattr(m, name).detach()  # every rank built the same init
                dims = [0 if n == "ep" else hidden for n in names]
                for i, d in enumerate(dims):
                    local = local.chunk(mesh.shape[i], dim=d)[mesh.get_local_rank(i)]
                setattr(m, name, nn.Parameter(DTensor.from_local(local.clone(), mesh, [Shard(d) for d in dims],
                                                                 run_check=False)))
            m.expert_parallel = dispatcher


def experts_sharded(dims: MeshDims) -> bool:
    """Whether FSDP shards the experts (`shard_experts`): they are DTensors (ep or tp > 1) with dp_shard copies."""
    return dims.ep * dims.tp > 1 and dims.dp_shard > 1


def shard_experts(block: nn.Module, env: DistEnv, mp: Any) -> None:
    """FSDP over the copies of each expert shard, as torchtitan's `dp_shard_mod_ep`: the experts of a rank's ep
    (and tp) group are the same on its dp_shard ranks, so they are split once more over dp_shard (with HSDP,
    replicated over dp_replicate too). Each rank then holds 1/(dp_shard x ep x tp) of the experts, gathers its
    ep group's share for the MoE's forward and backward, and reduce-scatters their gradients, where they were
    whole on every copy and all-reduced.

    The block is already sharded (its experts left out), so this unit, applied inside it afterwards, takes the
    experts only; the router stays with the block's unit, on the mesh of the dense weights. The gradients are
    divided by every data rank (the loss is each rank's mean, and the experts' gradients already sum what the
    ep group's tokens sent them), not by the dp_shard ranks FSDP reduces over; ranks whose experts no token
    reached still join the reduce-scatter with zeros."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    dims = env.dims
    mesh = env.mesh["expert_hsdp" if dims.dp_replicate > 1 else "dp_shard"]
    for moe in (m for m in block.modules() if isinstance(m, MoE)):
        # Whole experts per rank where the dp_shard ranks can share the ep group's evenly; else every expert's
        # hidden units are split (FSDP would pad the expert index, and a rank would gather padding).
        dim = 0 if (moe.num_experts // dims.ep) % dims.dp_shard == 0 else 1
        fully_shard(moe, mesh=mesh, mp_policy=mp, shard_placement_fn=lambda p, d=dim: Shard(d),
                    ignored_params=set(moe.gate.parameters()))
        moe.set_gradient_divide_factor(float(dims.data))
        # A divide factor other than the group's size is NCCL's PREMUL_SUM in fp32/bf16, which gloo refuses:
        # on CPU, sum and divide after (what FSDP does for float64 anyway).
        moe.set_force_sum_reduction_for_comms(env.device.type != "cuda")
        moe.set_reduce_scatter_unused_params(True)


def sync_expert_grads(model: nn.Module, env: DistEnv) -> None:
    """Each rank's expert gradients sum what every rank's tokens sent them (the all-to-all's backward); the
    loss is the mean over the data ranks, so divide by their number, and sum over the copies of each shard
    (dp_replicate). With dp_shard copies FSDP does both (`shard_experts`)."""
    if env.dims.ep * env.dims.tp == 1 or experts_sharded(env.dims):
        return
    group = env.mesh["expert_dp"].get_group() if env.dims.dp_replicate * env.dims.dp_shard > 1 else None
    for w in expert_params(model):
        if w.grad is None:  # no token reached this rank's experts
            w.grad = torch.zeros_like(w)
        g = w.grad.to_local()
        if group is not None:
            dist.all_reduce(g, group=group)
        g.div_(env.dims.data)


class _DataMean:
    """MoE.data_mean: the mean over the data ranks of a router statistic (the load fractions, the mean
    router probabilities), so every rank's balance loss is the global batch's. The gradient flows through
    this rank's own share only, scaled so that the data-parallel average of the gradients is the one
    process's (a straight-through estimate: value of the mean, gradient of the local term x ranks)."""

    def __init__(self, group: Any):
        self.group = group

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        total = t.detach().clone()
        dist.all_reduce(total, group=self.group)
        return t + (total / dist.get_world_size(self.group) - t.detach())


def set_data_mean(model: nn.Module, group: Any) -> None:
    mean = _DataMean(group)
    for m in model.modules():
        if isinstance(m, MoE):
            m.data_mean = mean


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over parameters that live on different meshes (FSDP's, tp's, ep's, or plain tensors):
    one norm per mesh made whole (`full_tensor`), summed, then one scale.
    torch's own clip_grad_norm_ stacks the per-parameter norms and fails across meshes."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for g in grads:
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    total = None
    for mesh, group in by_mesh.items():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        total = norm**2 if total is None else total + norm**2
    if total is None:
        return torch.zeros(())
    total = total.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
    for g in grads:  # a DTensor's local shard is scaled in place: no collective, no mixing of meshes
        (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device))
    return total


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-steps: accumulation then costs one reduce per step."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield

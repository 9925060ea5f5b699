"""Every layout of the device mesh trains as one process does: DDP 2, FSDP 2, TP 2 (dense, and MoE compiled with
the aot_eager backend), EP 2, FSDP 2 x TP 2 (dense and MoE), FSDP 2 x EP 2, EP 2 x TP 2 (compiled with inductor),
HSDP (DDP 2 x EP 2: FSDP over the ep pair,
replicated across the pairs), DDP 2 x FSDP 2 x EP 2 (the experts HSDP-sharded) and FSDP 2 x EP 4 (one expert
per ep rank, so FSDP splits its hidden units), with gradient accumulation and clipping, on CPU with gloo, in three torchrun launches (2, 4 and 8 ranks)
(tests/parallel_layouts.py runs the layouts of a world size one after another in its process group and writes
their losses, grad norms and collectives).

Tolerance: 1e-6 relative. The models are float64, but RMSNorm and the router compute in float32 by design
and the step's loss is summed in float32, so layouts that reduce in another order differ by float32 ulps
(measured: at most 2.3e-7 relative, under TP on the MoE; 1.7e-7 for EP 2 x TP 2 compiled by inductor); a rank that reads another rank's windows, a balance
loss taken over one rank's tokens instead of the global batch, or a gradient left unsynchronised moves them by
1e-4 or more. EP 2 x TP 2 and FSDP 2 x EP 2 also train under bf16 autocast (fp32 weights, `--train.precision bf16`) against one
process under it: losses within 1e-3 and grad norms within 2e-2 relative (measured: 4.5e-5 and 5.5e-3; bf16
keeps 8 bits, and the layouts round their partial sums at different points, which moves the weights apart
step by step), and step 1's grad norm, taken from identical weights, within 5e-4 (measured: 5.6e-5; the
experts' gradients left undivided by the data ranks move it 1.2e-3). That proves bf16 runs through the layout,
not the 1e-6 agreement the float64 layouts prove.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parallel_layouts as pl
from gptmini import checkpoint, parallel
from gptmini.config import model_preset
from gptmini.errors import UserError
from gptmini.parallel import MeshDims, mesh_args, mesh_dims

REL = 1e-6
BF16_REL = {"loss": 1e-3, "grad_norm": 2e-2, "first_grad_norm": 5e-4}
BIN = Path(sys.executable).parent
LAYOUTS = [(world, name) for world, names in pl.LAYOUTS.items() for name in names]


# Over 60 s (about 105 s alone, 75 to 140 s in a fresh clone's suite): three torchrun launches (2, 4 and 8 gloo
# ranks on 2 cores), one per world size, each running all its layouts in one process group; about 35 s of it is
# inductor generating and compiling C++ for EP 2 x TP 2 with an empty cache, the one proof that inductor compiles
# the sharded blocks (inductor on TP 2 of the MoE instead costs as much, and proves less).
@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("layouts")
    results = {}
    for world in pl.LAYOUTS:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(world),
               str(Path(__file__).with_name("parallel_layouts.py")), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                                   "PYTHONPATH": str(Path(__file__).parent)})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        results.update(json.loads((out / f"layouts-{world}.json").read_text()))
    results["dir"] = out
    return results


@pytest.fixture(scope="module")
def one_process() -> dict[tuple[str, str], dict]:
    runs = {(pl.LAYOUTS[world][name][0], pl.PRECISION.get(name, "fp32")) for world, name in LAYOUTS}
    return {(model, precision): pl.one_process(model, precision) for model, precision in runs}


def close(a: list[float], b: list[float], rel: float = REL) -> bool:
    return all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,name", LAYOUTS)
def test_layout_gives_one_process_losses_and_grad_norms(layouts, one_process, world, name):
    got = layouts[name]
    want = one_process[(got["model"], got["precision"])]
    rel = BF16_REL if got["precision"] == "bf16" else {"loss": REL, "grad_norm": REL}
    assert close(got["loss"], want["loss"], rel["loss"]), (got["loss"], want["loss"])
    assert close(got["grad_norm"], want["grad_norm"], rel["grad_norm"]), (got["grad_norm"], want["grad_norm"])
    if got["precision"] == "bf16":
        assert close(got["grad_norm"][:1], want["grad_norm"][:1], rel["first_grad_norm"]), (got, want)
    assert (got["graphs"] > 0) == (name in pl.COMPILED)  # dynamo traced the blocks the layout compiled


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", ["tp2", "fsdp2xtp2", "tp2-moe", "ep2xtp2", "fsdp2xtp2-moe", "ep2xtp2-bf16"])
def test_norm_and_router_weights_stay_identical_across_tp_ranks(layouts, name):
    assert layouts[name]["replicas_agree"]


# The collectives of one training step (2 micro-batches, the loss reduced for the log), as CommDebugMode
# counts them; docs/scaling.md explains each. A per-block FSDP unit gathers twice per micro-batch (forward
# and backward, 2 blocks + the root's embedding/norm/output); TP's plan gathers and reduce-scatters the
# sequence around attention and feed-forward (5 of each per block and micro-batch); EP adds 2 all-to-alls of
# tokens and 1 of counts per MoE layer and micro-batch, forward, and 2 backward. TP on an MoE adds one
# all-reduce per MoE layer and micro-batch (the routing weights' gradient); HSDP one all-reduce per FSDP unit
# over the replicas. Experts split by ep or tp and FSDP-sharded over dp_shard are one more FSDP unit per MoE
# layer: 2 gathers per micro-batch and 1 reduce-scatter per step each, where their 3 tensors were all-reduced.
COLLECTIVES = {
    "ddp2": {"broadcast_": 1, "allreduce_": 2},
    "fsdp2": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "all_reduce": 1, "allreduce_": 1},
    "tp2": {"all_gather_into_tensor": 20, "reduce_scatter_tensor": 20, "all_reduce": 27, "allreduce_": 1},
    "ddp2-moe": {"broadcast_": 1, "allreduce_": 10},
    "fsdp2-moe": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "all_reduce": 1, "allreduce_": 9},
    "ep2": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "alltoall_base_": 4, "all_to_all_single": 16,
            "all_reduce": 2, "allreduce_": 9},
    "fsdp2xtp2": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "all_gather_into_tensor": 20,
                  "reduce_scatter_tensor": 20, "all_reduce": 13, "allreduce_": 1},
    "fsdp2xep2": {"_allgather_base_": 18, "_reduce_scatter_base_": 5, "alltoall_base_": 4,
                  "all_to_all_single": 16, "all_reduce": 2, "allreduce_": 9},
    "tp2-moe": {"all_gather_into_tensor": 20, "reduce_scatter_tensor": 20, "all_reduce": 31, "allreduce_": 1},
    "ep2xtp2": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "all_gather_into_tensor": 20,
                "reduce_scatter_tensor": 20, "alltoall_base_": 4, "all_to_all_single": 16, "all_reduce": 20,
                "allreduce_": 9},
    "ddp2xep2": {"_allgather_base_": 10, "_reduce_scatter_base_": 3, "alltoall_base_": 4,
                 "all_to_all_single": 16, "all_reduce": 2, "allreduce_": 18},
    "fsdp2xtp2-moe": {"_allgather_base_": 18, "_reduce_scatter_base_": 5, "all_gather_into_tensor": 20,
                      "reduce_scatter_tensor": 20, "all_reduce": 20, "allreduce_": 9},
    "ddp2xfsdp2xep2": {"_allgather_base_": 18, "_reduce_scatter_base_": 5, "alltoall_base_": 4,
                       "all_to_all_single": 16, "all_reduce": 2, "allreduce_": 14},
    "fsdp2xep4": {"_allgather_base_": 18, "_reduce_scatter_base_": 5, "alltoall_base_": 4,
                  "all_to_all_single": 16, "all_reduce": 2, "allreduce_": 9},
}
# Under bf16 autocast a layout sends the same collectives as in full precision.
COLLECTIVES |= {f"{name}-bf16": COLLECTIVES[name] for name in ("ep2xtp2", "fsdp2xep2")}


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,name", LAYOUTS)
def test_collectives_per_step_are_the_designs(layouts, world, name):
    assert layouts[name]["collectives"] == COLLECTIVES[name]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("world,name", [(w, n) for w, n in LAYOUTS if pl.LAYOUTS[w][n][0] == "moe"])
def test_each_rank_holds_its_share_of_the_experts(layouts, world, name):
    """Every copy of an expert shard is FSDP-sharded: a rank holds 1/(dp_shard x ep x tp) of the experts, and DDP
    replicas hold whole copies."""
    dims = pl.LAYOUTS[world][name][1]
    assert layouts[name]["expert_share"] == 1 / (dims.dp_shard * dims.ep * dims.tp)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("name", pl.CHECKPOINTED)
def test_checkpoint_written_under_a_mesh_resumes_in_one_process(layouts, name):
    """The step-2 DCP checkpoint of a tp, ep or FSDP x ep run (an MoE's experts split by tp, or by ep and FSDP on
    the expert index or, one expert per ep rank, its hidden units),
    loaded into a plain model and optimizer (no process group), trains step 3 to the loss and grad norm the run
    logged."""
    got = layouts[name]
    env = parallel.DistEnv(0, 0, 1, torch.device("cpu"))
    model = pl.build(got["model"])
    run = pl.run_for(got["model"], env, model)
    path = checkpoint.step_dir(layouts["dir"] / name, pl.CKPT_STEP)
    checkpoint.load_checkpoint(path, model, run.optimizer, env)
    del run.train_loader.micro[: pl.CKPT_STEP * pl.ACCUM]
    loss, norm = pl.step(run)
    assert math.isclose(loss, got["loss"][pl.CKPT_STEP], rel_tol=REL), (loss, got["loss"])
    assert math.isclose(norm, got["grad_norm"][pl.CKPT_STEP], rel_tol=REL), (norm, got["grad_norm"])


# The layout a set of degrees gives, without launching anything (mesh_dims is pure): the refusals are in
# tests/test_bad_inputs.py.
SEED = model_preset("seed")
SEED_DENSE = model_preset("seed", num_experts=0, n_kv_heads=4)


@pytest.mark.parametrize("world,flags,model,dims", [
    (8, ("fsdp", 0, 1, 1), SEED, MeshDims(dp_shard=8)),
    (8, ("ddp", 0, 1, 1), SEED, MeshDims(dp_replicate=8)),
    (8, ("fsdp", 0, 1, 4), SEED, MeshDims(dp_shard=2, ep=4)),  # ep borrows data ranks; fsdp takes the rest
    (16, ("ddp", 8, 1, 1), SEED, MeshDims(dp_replicate=2, dp_shard=8)),  # HSDP: shard in a node, replicate across
    (8, ("fsdp", 0, 2, 1), SEED_DENSE, MeshDims(dp_shard=4, tp=2)),
    (2, ("none", 0, 2, 1), SEED_DENSE, MeshDims(tp=2)),  # tp alone needs no data-parallel mode
    (48, ("fsdp", 0, 3, 8), SEED, MeshDims(dp_shard=2, ep=8, tp=3)),  # the seed MoE: its 3 kv heads split by 3
    (4, ("ddp", 0, 2, 1), SEED_DENSE, MeshDims(dp_replicate=2, tp=2)),  # HSDP x TP
])
def test_mesh_dims_give_the_layout(world, flags, model, dims):
    parallel_mode, dp_shard, tp, ep = flags
    assert mesh_dims(world, parallel_mode, dp_shard, tp, ep, model) == dims
    assert dims.world == world


def test_the_flows_layout_string_becomes_trainer_flags():
    assert mesh_args("fsdp") == ["--parallel", "fsdp"]
    assert mesh_args("fsdp+tp:2") == ["--parallel", "fsdp", "--tp", "2"]
    assert mesh_args("fsdp:2+ep:4") == ["--parallel", "fsdp", "--dp-shard", "2", "--ep", "4"]
    with pytest.raises(UserError, match="'tp'"):
        mesh_args("fsdp+tp")

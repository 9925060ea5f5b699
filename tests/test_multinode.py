"""Two nodes through torchrun's real c10d rendezvous: two agents on 127.0.0.1 (`--nnodes 2`, one process each,
gloo on CPU), both writing into one run folder as nodes on shared storage do.

Ranks that meet at a rendezvous are the same two ranks as `--standalone --nproc-per-node 2`'s: the same
windows per rank, the same reductions. So the two-node runs repeat the one-node reference runs' losses and
weights to the last bit, and what they checkpoint resumes on one process. Each agent runs the command the
train-gpt flow logs for a user to paste on every further node (`gptmini.launch.local.node_command`), with nothing
that says which one hosts the rendezvous's store: torchrun's c10d backend tries to host it wherever the
endpoint names this machine, and an agent that finds the port taken (the other got there first) joins as a
client.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from gptmini.files import read_json
from gptmini.launch.local import node_command, torchrun_args
from gptmini.metrics import read_metrics
from train_helpers import BIN, COMMON, STEPS, env, run_to_end, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.dist]

MODES = ("ddp", "fsdp")


def two_node_cmd(data_dir: Path, out: Path, port: int, rdzv_id: str, *extra: str) -> list[str]:
    """The reference recipe as the flow's logged command for further nodes, with the venv's torchrun (as if
    activated): one command for every node."""
    launch = torchrun_args(1, 2, f"127.0.0.1:{port}", rdzv_id)
    pasted = shlex.split(node_command(launch, [*COMMON, "--data-dir", str(data_dir), "--out", str(out), *extra]))
    assert pasted[0] == "torchrun"
    return [str(BIN / "torchrun"), *pasted[1:]]


def run_agents(cmds: list[list[str]], log_prefix: Path, timeout: float = 300) -> None:
    """Start the commands together, each in a process group of its own that is killed whole if it outlives
    `timeout` (an agent whose peer died waits out the rendezvous); every one must exit 0."""
    logs = [Path(f"{log_prefix}-node{i}.log") for i in range(len(cmds))]
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        codes = [proc.wait(timeout=max(deadline - time.monotonic(), 1)) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert codes == [0] * len(cmds), "\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in logs)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of the train records in the order written: a second writer would show as repeated steps."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def two_nodes(small_shards: Path, tmp_path_factory) -> dict[str, Path]:
    """The reference DDP and FSDP runs again, on two agents of one process each, into one run folder."""
    root = tmp_path_factory.mktemp("two-nodes")
    for mode in MODES:
        cmd = two_node_cmd(small_shards, root / mode, free_port(), f"two-nodes-{mode}", "--parallel", mode)
        run_agents([cmd, cmd], root / mode)
    return {mode: root / mode for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_two_nodes_repeat_the_losses_and_weights_of_two_ranks_on_one_node_bit_for_bit(mode, reference_runs,
                                                                                     two_nodes):
    """Measured equal to the last bit: a reduction over 2 ranks adds the same two numbers in either order. A
    rank that read other windows or skipped a gradient sync moves the loss by ~1e-3 from step 2."""
    two, one = losses(two_nodes[mode]), losses(reference_runs[mode])
    assert [step for step, _ in two] == list(range(1, STEPS + 1))
    assert two == one
    assert read_json(two_nodes[mode] / "summary.json")["world_size"] == 2
    a, b = (load_file(runs[mode] / "final" / "model.safetensors") for runs in (two_nodes, reference_runs))
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_a_checkpoint_sharded_across_two_nodes_resumes_on_one_process(two_nodes, small_shards, tmp_path):
    """FSDP's checkpoint of step 6, each node's shard and rank state written into one folder, resumed by one
    process with 2x accumulation (the same global batch): DCP reshards the weights and the optimizer, the
    sampler's position is global, so steps 7-8 repeat the two-node run's losses and end on its weights."""
    ckpt = two_nodes["fsdp"] / "checkpoints" / "step_00000006"  # keep_last 2: steps 6 and 8 are kept
    assert read_json(ckpt / "trainer_state.json")["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rank_*.json")) == ["rank_00000.json", "rank_00001.json"]
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = tmp_path / "resumed-1p"
    proc = run_to_end(train_cmd(small_shards, out, "--resume", str(ckpt)))
    assert f"resumed from {ckpt} at step 6" in proc.stdout
    assert "written by 2 rank(s), this run has 1" in proc.stdout
    resumed, whole = losses(out), dict(losses(two_nodes["fsdp"]))
    assert [step for step, _ in resumed] == [7, 8]
    assert [loss for _, loss in resumed] == pytest.approx([whole[7], whole[8]], rel=1e-4)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (out, two_nodes["fsdp"]))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

"""Two nodes through torchrun's real c10d rendezvous: two agents on 127.0.0.1 (`--nnodes 2`, one process each,
gloo on CPU), both writing into one run folder as nodes on shared storage do.

Ranks that meet at a rendezvous are the same two ranks as `--standalone --nproc-per-node 2`'s: the same
windows per rank, the same reductions. So the two-node runs repeat a one-node run's losses, and what they
checkpoint resumes on one node. The agents start as a user starts them: the same command on every node, with
nothing that says which one hosts the rendezvous's store. torchrun's c10d backend tries to host it wherever
the endpoint names this machine, and an agent that finds the port taken (the other got there first) joins
as a client.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from gptmini.files import read_json
from gptmini.launch import torchrun_args
from gptmini.metrics import read_metrics
from test_flows import TINY, stack  # noqa: F401  (stack: the fixture; a Prefect test server, a SQLite MLflow store)
from test_train import BIN, env, run, train_cmd

pytestmark = [pytest.mark.slow, pytest.mark.dist]

STEPS = 4  # checkpoints at steps 2 and 4: step 2's has steps left to resume
MODES = ("ddp", "fsdp")
# Measured: the two-node and the one-node runs agree to the last bit, losses and weights (a sum over 2 ranks
# is the same in any order). 1e-6 leaves room for a few float32 ulps (eps 1.2e-7) should a reduction change
# its order; a rank that read other windows or skipped a gradient sync moves the loss by ~1e-3 from step 2.
REL = 1e-6


def two_node_cmd(data_dir: Path, out: Path, port: int, rdzv_id: str, *extra: str) -> list[str]:
    """test_train's command with the flow's two-node launcher arguments in place of `--standalone
    --nproc-per-node 2`: one command for every node."""
    cmd = train_cmd(data_dir, out, 2, *extra)
    return [cmd[0], *torchrun_args(1, 2, f"127.0.0.1:{port}", rdzv_id), *cmd[cmd.index("-m"):]]


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
def one_node(prepared_shards: Path, tmp_path_factory) -> dict[str, Path]:
    """2 ranks on one node (torchrun --standalone), DDP and FSDP."""
    root = tmp_path_factory.mktemp("one-node")
    for mode in MODES:
        run(train_cmd(prepared_shards, root / mode, 2, "--parallel", mode, "--steps", str(STEPS)))
    return {mode: root / mode for mode in MODES}


@pytest.fixture(scope="module")
def two_nodes(prepared_shards: Path, tmp_path_factory) -> dict[str, Path]:
    """The same runs on two agents of one process each, into one run folder."""
    root = tmp_path_factory.mktemp("two-nodes")
    for mode in MODES:
        cmd = two_node_cmd(prepared_shards, root / mode, free_port(), f"two-nodes-{mode}", "--parallel", mode,
                           "--steps", str(STEPS))
        run_agents([cmd, cmd], root / mode)
    return {mode: root / mode for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_two_nodes_repeat_the_losses_and_weights_of_two_ranks_on_one_node(mode, one_node, two_nodes):
    two, one = losses(two_nodes[mode]), losses(one_node[mode])
    assert [step for step, _ in two] == list(range(1, STEPS + 1))
    assert [loss for _, loss in two] == pytest.approx([loss for _, loss in one], rel=REL)
    assert read_json(two_nodes[mode] / "summary.json")["world_size"] == 2
    a, b = (load_file(runs[mode] / "final" / "model.safetensors") for runs in (two_nodes, one_node))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=REL, atol=0, msg=k)


def test_a_checkpoint_sharded_across_two_nodes_resumes_on_one(two_nodes, prepared_shards, tmp_path):
    """FSDP's checkpoint of step 2, each node's shard and rank state written into one folder, resumed by 2
    ranks on one node: the same world size, so the weights, the optimizer, the sampler's position and every
    rank's RNG carry over, and steps 3-4 repeat the two-node run's losses."""
    ckpt = two_nodes["fsdp"] / "checkpoints" / "step_00000002"
    assert read_json(ckpt / "trainer_state.json")["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("rank_*.json")) == ["rank_00000.json", "rank_00001.json"]
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = tmp_path / "resumed"
    proc = run(train_cmd(prepared_shards, out, 2, "--parallel", "fsdp", "--steps", str(STEPS), "--resume", str(ckpt)))
    assert f"resumed from {ckpt} at step 2" in proc.stdout and "RNG streams start anew" not in proc.stdout
    resumed, whole = losses(out), dict(losses(two_nodes["fsdp"]))
    assert [step for step, _ in resumed] == [3, 4]
    assert [loss for _, loss in resumed] == pytest.approx([whole[3], whole[4]], rel=REL)


def logged_command(marker: str, flow: threading.Thread, timeout: float) -> str:
    """The line after `marker` in a log record on the Prefect server (what a user reads in the UI), looked for
    while the flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while flow.is_alive() and time.monotonic() < deadline:
            for log in client.read_logs(log_filter=LogFilter(text=LogFilterTextSearch(query=f'"{marker}"'))):
                if marker in log.message:
                    return log.message.split(marker, 1)[1].strip().splitlines()[0]
            time.sleep(0.5)
    raise AssertionError(f"no log record says {marker!r}: "
                         + (f"none in {timeout:.0f} s" if flow.is_alive() else "the flow ended"))


def test_flow_on_two_nodes_runs_node_1_from_the_command_it_logs(stack, monkeypatch, tmp_path):  # noqa: F811
    """The train task logs the command for the other nodes and starts node 0; the test pastes it as node 1."""
    from flows.train_gpt import train_gpt
    from gptmini import registry

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # node 0's rank: one thread, as test_train's runs have
    params = {**TINY, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"}
    states = []
    # In a copy of this context, which holds the test harness's Prefect settings.
    flow = threading.Thread(target=contextvars.copy_context().run, daemon=True,
                            args=(lambda: states.append(train_gpt(**params, return_state=True)),))
    flow.start()
    command = shlex.split(logged_command("start this on each of them:", flow, timeout=180))
    assert command[0] == "torchrun"
    run_agents([[str(BIN / "torchrun"), *command[1:]]], tmp_path / "paste")  # the venv's torchrun: as if activated
    flow.join(timeout=300)
    assert states, "the flow did not end within 5 minutes of node 1"
    assert states[0].is_completed(), states[0].message
    result = states[0].result()
    summary = read_json(Path(result["run_dir"]) / "summary.json")
    assert summary["world_size"] == 2 and summary["parallel"] == "ddp"  # `auto` for 2 nodes of 1 process
    mc = registry.client(stack)
    assert mc.get_run(result["mlflow_run_id"]).data.params["run.world_size"] == "2"
    assert mc.get_model_version("gptmini", result["version"]).run_id == result["mlflow_run_id"]

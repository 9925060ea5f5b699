"""`gptmini launch slurm [options] -- TRAIN ARGS`: `gptmini train` across nodes as one Slurm job.

    gptmini launch slurm --nodes 2 --gpus-per-node 8 --nproc-per-node 8 --partition gpu --time 04:00:00 \\
        -- --preset seed --data-dir /shared/shards --out /shared/runs/seed-1

The train arguments are checked here, on the login node, before anything is queued. The job script lands in
the run folder (`slurm-job.sh`, submitted as is, so a user can read or resubmit it), and its output is followed
until the job ends: exit 0 when it completed, 2 when sbatch or the trainer refused the configuration, 1 for any
other end (the state is printed; `--resume auto` is always on, so running the command again resumes).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gptmini import ending, parallel
from gptmini.cli import run
from gptmini.cli.train import out_dir_of, parse
from gptmini.errors import Failure, UserError
from gptmini.launch import COMPLETED, slurm


def resume_auto(train_args: list[str]) -> list[str]:
    """The trainer's arguments with `--resume auto` unless they name a resume point: a requeued or resubmitted
    job must continue from the run's last checkpoint, not start over into the same folder."""
    return train_args if any(a == "--resume" or a.startswith("--resume=") for a in train_args) else [
        *train_args, "--resume", "auto"]


def launch_slurm(args: argparse.Namespace) -> int:
    train_args = resume_auto(args.train_args)
    cfg, _ = parse(train_args)  # a ConfigError (exit 2) now, not after the job waited in the queue
    world = args.nodes * args.nproc_per_node
    t = cfg.train
    try:  # the mesh must split over the job's ranks: tp inside a node, fsdp/ddp (or ep) across them
        parallel.mesh_dims(world, t.parallel, t.dp_shard, t.tp, t.ep, cfg.model)
    except UserError as exc:
        raise UserError(f"--nodes {args.nodes} x --nproc-per-node {args.nproc_per_node} = {world} ranks: {exc}") from None
    out = out_dir_of(train_args)
    if not out:
        raise UserError("the train arguments need --out DIR: the run folder, on storage every node sees")
    run_dir = Path(out).resolve()
    options = slurm.SlurmOptions(partition=args.partition, account=args.account, time_limit=args.time,
                                 gpus_per_node=args.gpus_per_node, sbatch_lines=args.sbatch, requeue=args.requeue)
    options.check()
    script = run_dir / "slurm-job.sh"
    if not args.follow:
        job = slurm.submit(slurm.write_script(train_args, run_dir, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                                              options=options, job_name=args.job_name))
        print(f"submitted Slurm job {job}; output: {run_dir / f'slurm-{job}.out'}")
        return 0
    # SIGTERM (a `kill`, a cancelled flow run) unwinds like Ctrl-C, so the job being followed is scancelled.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        state = slurm.launch(train_args, run_dir, nodes=args.nodes, nproc_per_node=args.nproc_per_node,
                             options=options, on_line=lambda line: print(line, flush=True), job_name=args.job_name,
                             on_submit=lambda job: print(f"submitted Slurm job {job} ({script})", flush=True))
    finally:
        signal.signal(signal.SIGTERM, previous)
    return job_ended(run_dir, state)


def job_ended(run_dir: Path, state: str) -> int:
    """0 when the job COMPLETED and the trainer's summary says so; a UserError (exit 2) when the trainer
    refused its configuration or data; else a Failure (exit 1) that says how the job ended."""
    try:
        ending.outcome(ending.read(run_dir), state == COMPLETED, f"the Slurm job ended {state}")
    except ending.TrainingFailed as exc:
        if not exc.retryable:
            raise UserError(str(exc)) from None
        raise Failure(f"{exc} (run the same command again)") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="gptmini launch", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Everything after `--` goes to `gptmini train` on every node.")
    sub = p.add_subparsers(dest="launcher", required=True)
    s = sub.add_parser("slurm", help="one sbatch job; srun starts one torchrun agent per node")
    s.add_argument("--nodes", type=int, default=1, help="nodes (sbatch --nodes; default 1)")
    s.add_argument("--nproc-per-node", type=int, default=1, help="processes per node, one per GPU (default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="sbatch --gpus-per-node (default 0: none)")
    s.add_argument("--partition", help="sbatch --partition (default: the site's)")
    s.add_argument("--account", help="sbatch --account")
    s.add_argument("--time", help="sbatch --time, e.g. 04:00:00")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="one more #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")
    s.add_argument("--requeue", action="store_true", help="let Slurm requeue the job; it resumes from the checkpoint")
    s.add_argument("--job-name", default="gptmini", help="the Slurm job name (default gptmini)")
    s.add_argument("--no-follow", dest="follow", action="store_false",
                   help="submit and exit, instead of streaming the output until the job ends")
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        p.error("put the train arguments after `--`, e.g. gptmini launch slurm --nodes 2 -- --preset tiny --out runs/x")
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.train_args = argv[split + 1:]
    return run("gptmini launch", lambda: launch_slurm(args))

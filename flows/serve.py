"""The deployments, and the process that serves them (started by `infra/stack.sh up`):

- `train-gpt/demo`: the demo preset on the embedded corpus, a few minutes on 2 CPU cores;
- `train-gpt/retrain`: scheduled retraining (cron $GPTMINI_RETRAIN_CRON, default 03:00 UTC daily, `off` to
  pause it; timezone $GPTMINI_RETRAIN_TZ) on the demo corpus plus the text files dropped into
  $GPTMINI_STATE/incoming/: it continues from production on what is new (nothing new: it ends at once,
  training nothing), and promotes the new version only when it beats production on the same validation data;
- `promote-model/promote`: move an alias (production by default) to a version;
- `prepare-data/prepare`: download and tokenize a corpus into the state folder, so train-gpt on every worker
  that shares it finds the shards cached.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    prefect deployment run train-gpt/demo --param steps=100 --watch
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.client.schemas.schedules import CronSchedule

from flows.prepare_data import prepare_data
from flows.promote import promote_model
from flows.tasks import state_dir
from flows.train_gpt import end_mlflow_run, train_gpt
from gptmini.redact import redact

RETRAIN_CRON = "0 3 * * *"
MODULE = EntrypointType.MODULE_PATH  # `flows` is an installed package: runs import it by name


def incoming_dir() -> Path:
    """Where users drop new text files for the retrain deployment (created here, so it is there to find)."""
    folder = state_dir() / "incoming"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def deployments() -> list:
    cron = os.environ.get("GPTMINI_RETRAIN_CRON", RETRAIN_CRON)
    paused = cron == "off"  # keep the deployment, pause its schedule (serve re-applies it on every start)
    cron = RETRAIN_CRON if paused else cron
    timezone = os.environ.get("GPTMINI_RETRAIN_TZ", "UTC")
    return [
        train_gpt.to_deployment(
            "demo", parameters={"preset": "demo", "sources": ["embedded:python-docs"]}, tags=["gptmini", "demo"], entrypoint_type=MODULE,
            description="The demo preset on the embedded corpus (CPython's docs): a few minutes on 2 CPU cores.",
        ),
        train_gpt.to_deployment(
            "retrain", schedule=CronSchedule(cron=cron, timezone=timezone), paused=paused,
            parameters={"preset": "demo", "sources": ["embedded:python-docs"], "promotion": "if-better",
                        "incoming": str(incoming_dir()), "init_from": "production"},
            tags=["gptmini", "scheduled"], entrypoint_type=MODULE,
            concurrency_limit=1,  # a run that comes due while the last one trains waits for it
            description=f"Scheduled retraining ({cron} {timezone}) on the demo corpus plus {incoming_dir()}: "
                        "continues from production on the new text (skips when nothing is new); promotes only a "
                        "version that beats production on the same validation data.",
        ),
        promote_model.to_deployment(
            "promote", tags=["gptmini"], entrypoint_type=MODULE, description="Point an alias (default production) at a registry version.",
        ),
        prepare_data.to_deployment(
            "prepare", parameters={"sources": ["embedded:python-docs"]}, tags=["gptmini"], entrypoint_type=MODULE,
            description="Download and tokenize a corpus into the shared state folder, so train-gpt on every "
                        "worker finds its shards cached.",
        ),
    ]


def live_flow_run_ids() -> set[str]:
    """Flow runs with a process on this machine: the runner puts PREFECT__FLOW_RUN_ID in each one's environment."""
    ids = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or another user's
            continue
        ids.update(e.split(b"=", 1)[1].decode() for e in entries if e.startswith(b"PREFECT__FLOW_RUN_ID="))
    return ids


def crash_orphaned_runs(deployment_names: list[str]) -> list[str]:
    """A serving process killed mid-run runs no state hook: its flow runs would stay RUNNING in Prefect and in
    MLflow for ever, and `prefect flow-run retry` takes only a finished run. So, before serving, each RUNNING
    or PENDING run of our deployments with no process left on this machine is marked Crashed, and its MLflow
    run FAILED. A retry then resumes training from that run's last checkpoint."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as api:
        ids = []
        for name in deployment_names:
            try:
                ids.append(api.read_deployment_by_name(name).id)
            except ObjectNotFound:  # first start: nothing served yet
                pass
        if not ids:
            return []
        active = FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])
        runs = api.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=active)),
                                  deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)))
        alive = live_flow_run_ids()
        for run in runs:
            if str(run.id) in alive:
                continue
            state = Crashed(message="the serving process stopped during this run (found when it restarted); "
                                    f"`prefect flow-run retry {run.id}` resumes it from its last checkpoint")
            api.set_flow_run_state(run.id, state, force=True)
            try:
                end_mlflow_run("FAILED")(None, run, state)
            except Exception as exc:  # MLflow down must not keep the deployments from being served
                print(f"could not mark the MLflow run of flow run {run.id} FAILED: {redact(str(exc))}", flush=True)
            crashed.append(str(run.id))
    return crashed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description="Serve the gptmini deployments "
                                 "(this process runs their flow runs), or register them for a work pool's workers.")
    ap.add_argument("--work-pool", help="register the deployments on this work pool (run by `prefect worker "
                    "start --pool NAME`, as in infra/docker-compose.yml) instead of serving them here")
    ap.add_argument("--limit", type=int, default=int(os.environ.get("GPTMINI_SERVE_LIMIT", "2")),
                    help="most flow runs at once in this process (default 2)")
    args = ap.parse_args(argv)
    if args.work_pool:
        for deployment in deployments():
            deployment.apply(work_pool_name=args.work_pool)
            print(f"registered {deployment.flow_name}/{deployment.name} on work pool {args.work_pool!r}")
        return
    served = deployments()
    for run_id in crash_orphaned_runs([f"{d.flow_name}/{d.name}" for d in served]):
        print(f"flow run {run_id} lost its process (this server was stopped mid-run): marked Crashed, its MLflow "
              f"run FAILED; resume it with `prefect flow-run retry {run_id}`", flush=True)
    serve(*served, limit=args.limit)


if __name__ == "__main__":
    main()

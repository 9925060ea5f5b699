"""The deployments, and the process that serves them (started by `infra/stack.sh up`):

- `train-gpt/demo`: the demo preset on the embedded corpus, a few minutes on 2 CPU cores;
- `train-gpt/retrain`: scheduled retraining (cron $GPTMINI_RETRAIN_CRON, default 03:00 UTC daily, `off` to
  pause it; timezone $GPTMINI_RETRAIN_TZ), which
  promotes the new version only when it beats production on the same validation data;
- `promote-model/promote`: move an alias (production by default) to a version.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    prefect deployment run train-gpt/demo --param steps=100 --watch
"""
from __future__ import annotations

import argparse
import os

from prefect import serve
from prefect.deployments.runner import EntrypointType
from prefect.client.schemas.schedules import CronSchedule

from flows.promote import promote_model
from flows.train_gpt import train_gpt

RETRAIN_CRON = "0 3 * * *"
MODULE = EntrypointType.MODULE_PATH  # `flows` is an installed package: runs import it by name


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
            parameters={"preset": "demo", "sources": ["embedded:python-docs"], "promotion": "if-better"},
            tags=["gptmini", "scheduled"], entrypoint_type=MODULE,
            description=f"Scheduled retraining ({cron} {timezone}); promotes only a version that beats "
                        "production on the same validation data.",
        ),
        promote_model.to_deployment(
            "promote", tags=["gptmini"], entrypoint_type=MODULE, description="Point an alias (default production) at a registry version.",
        ),
    ]


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
    serve(*deployments(), limit=args.limit)


if __name__ == "__main__":
    main()

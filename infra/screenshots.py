"""Screenshots of what a user sees of a training run in MLflow's UI (and Prefect's), taken by headless Chromium.

    python infra/screenshots.py http://127.0.0.1:5000 [--run RUN_ID] [--model gptmini] [--version N]
        [--prefect http://127.0.0.1:4200] [--flow-run ID] [--out docs/screenshots]

Without --run it takes the newest run of the experiment (default `gptmini`); without --version the newest version
of the registered model. Needs chromium (`apt-get install -y chromium`); talks to MLflow's REST API with the
standard library only, so it runs outside the project's virtual environment too.

The pages, in the order a user walks them:
  1-runs.png           the experiment's runs (the model-training layout, not MLflow 3's GenAI one)
  2-run-charts.png     the run's metric charts
  3-run-overview.png   the run's overview: its dataset (the shard folder) and its logged models
  4-models.png         the experiment's Models tab: the LoggedModels with their val metrics
  5-logged-model.png   one LoggedModel (the registered version's source): metrics, dataset, versions
  6-version.png        the registered version: its source run and model
  7-prefect.png        the flow run in Prefect (only with --prefect)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

WINDOW = "1400,1000"
# The UI fetches after its first paint; Chromium's virtual time lets those requests finish before the shot
# (15 s of it left the metric charts as spinners).
VIRTUAL_TIME_MS = 30000
# MLflow 3.17's sidebar starts in its GenAI mode in a fresh browser (Traces, Judges, "Agent versions" for the
# Models tab) whatever the experiment's kind; this query parameter selects the model-training one.
ML_VIEW = "?workflowType=machine_learning"


def api(base: str, path: str, body: dict | None = None, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def pick_run(base: str, experiment_id: str, run_id: str | None) -> str:
    if run_id:
        return run_id
    runs = api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1,
                                     "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not runs:
        sys.exit(f"screenshots: experiment {experiment_id} has no runs; train one first or pass --run")
    return runs[0]["info"]["run_id"]


def pick_version(base: str, name: str, version: str | None) -> dict | None:
    found = api(base, "model-versions/search", filter=f"name='{name}'").get("model_versions", [])
    if version:
        found = [v for v in found if str(v["version"]) == str(version)]
    return max(found, key=lambda v: int(v["version"]), default=None)


def run_models(base: str, experiment_id: str, run_id: str) -> list[str]:
    models = api(base, "logged-models/search", {"experiment_ids": [experiment_id]}).get("models", [])
    return [m["info"]["model_id"] for m in models if m["info"].get("source_run_id") == run_id]


def shoot(chromium: str, url: str, out: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={out}", f"--window-size={WINDOW}", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
                    url], check=True, capture_output=True, timeout=120)
    print(f"{out}  <- {url}")


def pages(args: argparse.Namespace) -> list[tuple[str, str]]:
    base = args.mlflow.rstrip("/")
    experiment = api(base, "experiments/get-by-name", experiment_name=args.experiment)["experiment"]
    exp_id = experiment["experiment_id"]
    run_id = pick_run(base, exp_id, args.run)
    version = pick_version(base, args.model, args.version)
    source = version["source"].removeprefix("models:/") if version and version["source"].startswith("models:/m-") else None
    model_id = source or next(iter(run_models(base, exp_id, run_id)), None)
    shots = [("1-runs.png", f"{base}/#/experiments/{exp_id}/runs{ML_VIEW}"),
             ("2-run-charts.png", f"{base}/#/experiments/{exp_id}/runs/{run_id}/model-metrics{ML_VIEW}"),
             ("3-run-overview.png", f"{base}/#/experiments/{exp_id}/runs/{run_id}{ML_VIEW}"),
             ("4-models.png", f"{base}/#/experiments/{exp_id}/models{ML_VIEW}")]
    if model_id:
        shots.append(("5-logged-model.png", f"{base}/#/experiments/{exp_id}/models/{model_id}{ML_VIEW}"))
    if version:
        shots.append(("6-version.png", f"{base}/#/models/{args.model}/versions/{version['version']}{ML_VIEW}"))
    if args.prefect:
        prefect = args.prefect.rstrip("/")
        shots.append(("7-prefect.png", f"{prefect}/runs/flow-run/{args.flow_run}" if args.flow_run else f"{prefect}/runs"))
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mlflow", help="the MLflow server's URL, e.g. http://127.0.0.1:5000")
    p.add_argument("--experiment", default="gptmini")
    p.add_argument("--run", help="a run id (default: the experiment's newest run)")
    p.add_argument("--model", default="gptmini", help="the registered model's name")
    p.add_argument("--version", help="its version (default: the newest)")
    p.add_argument("--prefect", help="the Prefect UI's URL, e.g. http://127.0.0.1:4200")
    p.add_argument("--flow-run", help="a flow run id to show in Prefect (default: its runs list)")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = p.parse_args(argv)
    if not shutil.which(args.chromium):
        sys.exit(f"screenshots: no {args.chromium!r}; install it (apt-get install -y chromium) or pass --chromium PATH")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, url in pages(args):
        shoot(args.chromium, url, args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run a deployment and follow it in the terminal, training's step lines included:

    eval "$(infra/stack.sh env)"
    python -m flows.follow train-gpt/demo --param steps=100

`prefect deployment run --watch` prints only state changes; this also prints every log line of the flow run
and its task runs as it reaches the server (the `train` task streams the trainer's output there), then exits
with the run's outcome: 0 Completed, 1 any other final state (or --timeout, or the API failing), 2 bad
arguments, 130 Ctrl-C (the run itself keeps running on the server).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timedelta
from typing import Any, TextIO
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
from prefect.client.schemas.objects import FlowRun, Log, State
from prefect.client.schemas.sorting import LogSort
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings
from prefect.utilities.urls import url_for

from gptmini import cli
from gptmini.errors import Failure, UserError

POLL_S = 1.5
PAGE = 200  # the server's default (and largest) page of logs
# Logs reach the server in batches, one every 2 s (PREFECT_LOGGING_TO_API_BATCH_INTERVAL), stamped when they
# were emitted by several threads: a line can land after a later-stamped one was already read. Each poll
# re-reads this window behind the newest line seen, and skips the ids it already printed.
LOOKBACK = timedelta(seconds=10)
# After the final state the run's last lines are still on their way: the flow's last batch, the runner's
# "process exited" line.
DRAIN_S = 5.0
SOURCE_WIDTH = 16  # task run names: train-3e2, export_best-af1


class UsageError(UserError):
    """Bad arguments: exit 2."""


class FollowError(Failure):
    """The run could not be started or followed: exit 1."""


# Arguments, parsed as `prefect deployment run` parses them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.follow",
                                     description="Run a deployment and print its logs as they arrive.")
    parser.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. train-gpt/demo")
    parser.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                        help="a flow parameter; VALUE is JSON, or else a string (repeatable)")
    parser.add_argument("--params", metavar="JSON", help="a JSON object of parameters ('-': read stdin); "
                        "--param wins over it")
    parser.add_argument("--timeout", type=float, metavar="S", help="stop following after S seconds (exit 1)")
    return parser.parse_args(argv)


def parse_value(key: str, text: str) -> Any:
    """JSON, or else the text itself as a string when it holds no quote: `prefect deployment run`'s rule, so
    `steps=100` is a number, `preset=tiny` a string and `prompts=["def"]` a list."""
    try:
        return json.loads(text)
    except ValueError as exc:
        if ("Extra data" in str(exc) or "Expecting value" in str(exc)) and '"' not in text:
            return parse_value(key, f'"{text}"')
        raise UsageError(f"--param {key}={text}: the value is not valid JSON ({exc}); "
                         f"quote it, e.g. --param '{key}=\"...\"'") from None


def parse_params(param: list[str], params: str | None, stdin: TextIO = sys.stdin) -> dict[str, Any]:
    base = parse_params_json(stdin.read() if params == "-" else params) if params is not None else {}
    overrides = {}
    for spec in param:
        key, sep, text = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {spec!r}: expected KEY=VALUE, e.g. --param steps=100")
        overrides[key] = parse_value(key, text)
    return {**base, **overrides}


def parse_params_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--params {text!r}: not valid JSON ({exc}); "
                         "pass an object, e.g. --params '{\"steps\": 100}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"--params {text!r}: expected a JSON object, e.g. --params '{{\"steps\": 100}}'")
    return value


# Starting the run


def api_url() -> str:
    url = get_current_settings().api.url
    if not url:  # the client would otherwise start a throwaway server that knows no deployments
        raise FollowError("PREFECT_API_URL is not set: start the stack (`make up`), then "
                          "`eval \"$(infra/stack.sh env)\"`")
    return url


def create_run(client: SyncPrefectClient, name: str, parameters: dict[str, Any]) -> FlowRun:
    if name.count("/") != 1 or name.startswith("/") or name.endswith("/"):
        raise UsageError(f"deployment {name!r}: expected FLOW/DEPLOYMENT, e.g. train-gpt/demo")
    try:
        deployment = client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise UsageError(f"no deployment {name!r} on {api_url()}; `prefect deployment ls` lists them "
                         "(is the serving process up? `infra/stack.sh status`)") from None
    known = set((deployment.parameter_openapi_schema or {}).get("properties", {}))
    if unknown := sorted(set(parameters) - known):
        raise UsageError(f"{name} has no parameter(s) {', '.join(unknown)}; it takes: {', '.join(sorted(known))}")
    try:
        return client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code in (409, 422):  # the parameters fail the deployment's schema
            raise UsageError(f"{name} refused the parameters: {exc.response.json().get('detail', exc)}") from None
        raise


def announce(run: FlowRun, deployment: str) -> None:
    print(f"flow run {run.name!r} of {deployment}\n  id:  {run.id}\n  UI:  {url_for(run) or '(set PREFECT_UI_URL)'}",
          flush=True)
    if run.parameters:
        print(f"  parameters: {json.dumps(run.parameters)}", flush=True)


# Following it


class LogCursor:
    """The run's log lines not printed yet, oldest first, paged so that a burst larger than a page is read
    whole."""

    def __init__(self, client: SyncPrefectClient, flow_run_id: UUID):
        self.client, self.flow_run_id = client, flow_run_id
        self.newest: datetime | None = None
        self.seen: dict[UUID, datetime] = {}

    def poll(self) -> list[Log]:
        since = self.newest - LOOKBACK if self.newest else None
        fresh = [log for log in self.read_since(since) if log.id not in self.seen]
        fresh.sort(key=lambda log: log.timestamp)
        for log in fresh:
            self.seen[log.id] = log.timestamp
        if fresh:
            self.newest = max(self.newest or fresh[-1].timestamp, fresh[-1].timestamp)
            start = self.newest - LOOKBACK  # what the next poll no longer reads need not be remembered
            self.seen = {i: t for i, t in self.seen.items() if t >= start}
        return fresh

    def read_since(self, since: datetime | None) -> list[Log]:
        log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
                               timestamp=LogFilterTimestamp(after_=since) if since else None)
        logs, offset = [], 0
        while True:
            page = self.client.read_logs(log_filter=log_filter, limit=PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            logs += page
            if len(page) < PAGE:
                return logs
            offset += PAGE


class TaskNames:
    """Task run id -> its name (`train-3fa`), read once per task run."""

    def __init__(self, client: SyncPrefectClient):
        self.client = client
        self.names: dict[UUID, str] = {}

    def __call__(self, task_run_id: UUID | None) -> str:
        if task_run_id is None:
            return "flow"
        if task_run_id not in self.names:
            self.names[task_run_id] = self.client.read_task_run(task_run_id).name
        return self.names[task_run_id]


def clock(when: datetime) -> str:
    return when.astimezone().strftime("%H:%M:%S")


def format_log(log: Log, source: str) -> str:
    level = "" if log.level < 30 else f"{'WARNING' if log.level < 40 else 'ERROR'} "
    prefix = f"{clock(log.timestamp)} {source:<{SOURCE_WIDTH}} "
    return "\n".join(prefix + level + line for line in log.message.splitlines() or [""])


def format_state(state: State) -> str:
    return f"{clock(state.timestamp)} {'flow':<{SOURCE_WIDTH}} -> {state.name}" + \
        (f": {state.message}" if state.message else "")


def follow(client: SyncPrefectClient, run: FlowRun, timeout: float | None) -> State:
    """Print the run's state changes and log lines until it is final; returns the final state."""
    deadline = time.monotonic() + timeout if timeout else None
    logs, names, printed_states = LogCursor(client, run.id), TaskNames(client), set()
    final_at = None
    while True:
        state = client.read_flow_run(run.id).state  # read before the logs: none written before it is missed
        for change in client.read_flow_run_states(run.id):
            if change.id not in printed_states:
                printed_states.add(change.id)
                print(format_state(change), flush=True)
        for log in logs.poll():
            print(format_log(log, names(log.task_run_id)), flush=True)
        if state is not None and state.is_final():
            final_at = final_at or time.monotonic()
            if time.monotonic() - final_at >= DRAIN_S:
                return state
        elif deadline and time.monotonic() > deadline:
            raise FollowError(f"flow run {run.name!r} is still {state.name if state else 'unknown'} after "
                              f"{timeout:g} s (--timeout); it keeps running on the server: "
                              f"cancel it with `prefect flow-run cancel {run.id}`")
        time.sleep(POLL_S)


def api_error(exc: httpx.HTTPError, url: str) -> str:
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403):
        return (f"the Prefect API at {url} answered {exc.response.status_code}: set PREFECT_API_AUTH_STRING "
                "(`eval \"$(infra/stack.sh env)\"` sets it)")
    if isinstance(exc, httpx.TransportError):
        return (f"cannot reach the Prefect API at {url} ({exc!r}): start the stack (`make up`), then "
                "`eval \"$(infra/stack.sh env)\"`")
    return f"the Prefect API at {url} failed: {exc}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse itself exits 2 on a malformed command line
    return cli.run("follow", lambda: follow_deployment(args))


def follow_deployment(args: argparse.Namespace) -> int:
    run, url = None, ""
    try:
        parameters = parse_params(args.param, args.params)
        url = api_url()
        with get_client(sync_client=True) as client:
            run = create_run(client, args.deployment, parameters)
            announce(run, args.deployment)
            state = follow(client, run, args.timeout)
    except httpx.HTTPError as exc:
        goes_on = f"; flow run {run.id} keeps running on the server (the Prefect UI shows it)" if run else ""
        raise FollowError(f"{api_error(exc, url)}{goes_on}") from None
    except KeyboardInterrupt:
        if run is None:
            print("\nfollow: interrupted; no flow run was created", file=sys.stderr)
        else:
            print(f"\nfollow: stopped following; flow run {run.name!r} ({run.id}) keeps running on the server.\n"
                  f"  cancel it with: prefect flow-run cancel {run.id}", file=sys.stderr)
        return 130
    print(f"flow run {run.name!r} finished {state.name}" + (f": {state.message}" if state.message else ""),
          flush=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m flows.follow` without a server: its arguments, and the paging of the log cursor against a fake
log API. The real run against the stack is in test_flows_stack.py."""
from __future__ import annotations

import io
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import uuid4

import pytest

import prefect  # noqa: F401

from prefect.client.schemas.objects import Log  # noqa: E402

from flows import follow  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_param_values_are_json_or_else_strings_and_param_wins_over_params():
    params = follow.parse_params(["steps=100", "preset=tiny", 'prompts=["def"]', "lr=1e-3", "name=a b"],
                                 '{"steps": 5, "nproc": 2}')
    assert params == {"steps": 100, "nproc": 2, "preset": "tiny", "prompts": ["def"], "lr": 1e-3, "name": "a b"}
    assert follow.parse_params([], "-", stdin=io.StringIO('{"steps": 7}')) == {"steps": 7}


@pytest.mark.parametrize("argv, named", [
    (["train-gpt/demo", "--param", "steps"], "'steps': expected KEY=VALUE"),
    (["train-gpt/demo", "--param", 'prompts=["def"'], "prompts="),
    (["train-gpt/demo", "--params", "{steps: 1}"], "--params"),
    (["train-gpt/demo", "--params", "[1]"], "expected a JSON object"),
])
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(follow, "get_client", None)  # never reached: arguments are checked first
    assert follow.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


class FakeLogs:
    """POST /logs/filter over a list: the flow run's filter by timestamp (inclusive), sorted, paged."""

    def __init__(self):
        self.logs: list[Log] = []

    def add(self, seconds: float, message: str) -> None:
        self.logs.append(Log(id=uuid4(), name="x", level=20, message=message, timestamp=T0 + timedelta(seconds=seconds)))

    def read_logs(self, log_filter, limit, offset, sort):
        after = log_filter.timestamp.after_ if log_filter.timestamp else None
        rows = sorted((log for log in self.logs if after is None or log.timestamp >= after), key=lambda l: l.timestamp)
        return rows[offset:offset + min(limit, follow.PAGE)]


def test_log_cursor_pages_through_a_burst_and_prints_each_line_once_even_when_it_arrives_late():
    api = FakeLogs()
    cursor = follow.LogCursor(api, uuid4())
    for i in range(2 * follow.PAGE + 50):  # more than two pages at once, many sharing a timestamp
        api.add(i // 100, f"line {i}")
    assert [log.message for log in cursor.poll()] == [f"line {i}" for i in range(2 * follow.PAGE + 50)]
    assert cursor.poll() == []
    api.add(3.5, "late")  # stamped before lines already read, arriving in a later batch
    api.add(9, "next")
    assert [log.message for log in cursor.poll()] == ["late", "next"]
    assert cursor.poll() == []


def test_ctrl_c_leaves_the_run_going_says_how_to_cancel_it_and_exits_130(capsys, monkeypatch):
    run = SimpleNamespace(id=uuid4(), name="berserk-muskox", parameters={})
    monkeypatch.setattr(follow, "api_url", lambda: "http://127.0.0.1:4200/api")
    monkeypatch.setattr(follow, "get_client", lambda sync_client: nullcontext(None))
    monkeypatch.setattr(follow, "create_run", lambda client, name, parameters: run)
    monkeypatch.setattr(follow, "announce", lambda run, name: None)

    def interrupted(client, run, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(follow, "follow", interrupted)
    assert follow.main(["train-gpt/demo"]) == 130
    assert f"prefect flow-run cancel {run.id}" in capsys.readouterr().err

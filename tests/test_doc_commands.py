"""Every command the documents show is one a user can type as written.

Each shell line in a ```bash block (and each `$ ` line of a ```console transcript) of README.md, BENCHMARKS.md or
docs/*.md is split into its simple commands, and each goes to the parser of the program it names: `gptmini`
subcommands (the train flags through the full config resolution, as the trainer does), `torchrun` (torch's own
parser, then the module or script it starts), the scripts under bench/ and tests/, `make` targets, `prefect
deployment run` and `python -m flows.follow` (the deployment exists and takes each `--param`), `curl` (the route
exists and the JSON body is a valid request), `kubectl apply -f` (the files exist). Nothing runs past its argument
parsing, except `gptmini train --print-config > FILE`, whose file a later line of the same document reads. A
program the check does not know fails the test, so a new kind of command cannot slip in unchecked.

Inline commands in the prose (`gptmini eval --rag`) are often fragments with placeholders: there the
subcommand and each flag must exist, and a `make` target must be one.

Running them for real is the job of the tests of each feature; this proves the documents did not drift
from the code: a renamed flag, a dropped script or deployment, a request field that no longer exists.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from test_docs import DOCUMENTS, ROOT, prose

SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<"}
KEYWORDS = {"until", "while", "do", "then", "if", "time", "!", "else"}
ENDINGS = {"done", "fi"}
# Programs that are not ours: their lines are shown for the reader to adapt (cp, cd) or are other projects' CLIs.
EXTERNAL = {"cp", "cd", "git", "sleep", "jq", "tee", "pip", "source", "export", "mlflow", "echo"}
# Prefect's own subcommands other than `deployment run` (worker, work-pool, flow-run) are Prefect's contract.
PREFECT_OWN = {"worker", "work-pool", "flow-run"}
INLINE = re.compile(r"(\S+=\S+ )*(\.venv/bin/)?(gptmini |make |python3? (bench|tests)/|bash bench/|prefect deployment run )")
PLACEHOLDER = re.compile(r"<|\.\.\.|…")


class Parsed(Exception):
    """Raised by argparse once it has parsed: the command is checked up to here and goes no further."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@dataclass
class Command:
    words: list[str]
    document: Path
    inline: bool
    writes: str | None = None  # the file a `> FILE` redirect writes

    def __str__(self) -> str:
        return f"{self.document.relative_to(ROOT)}: {shlex.join(self.words)}"


def shell_lines(text: str) -> list[tuple[str, bool]]:
    lines = []
    for kind, block in re.findall(r"^```(bash|sh|console)\n(.*?)^```", text, flags=re.M | re.S):
        block = re.sub(r"\\\n", " ", block).splitlines()
        if kind == "console":  # a transcript: the prompted lines, not the output
            block = [line[2:] for line in block if line.startswith("$ ")]
        lines += [(line, False) for line in block]
    for span in re.findall(r"`([^`\n]+)`", prose(text)):
        if INLINE.match(span) and not PLACEHOLDER.search(span):
            lines.append((span, True))
    return lines


def simple_commands(line: str, document: Path, inline: bool) -> list[Command]:
    lex = shlex.shlex(re.sub(r"\d?>&\d", "", line), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, words, writes = [], [], None
    tokens = list(lex)
    i = 0
    while i <= len(tokens):
        token = tokens[i] if i < len(tokens) else ";"
        if token in REDIRECTS:
            writes = tokens[i + 1] if token != "<" else writes
            i += 2
            continue
        if token in SEPARATORS:
            while words and (words[0] in KEYWORDS or re.match(r"[A-Za-z_]+=", words[0])):  # `until`, `X=1 cmd`
                words.pop(0)
            if words and words[0] not in ENDINGS:
                commands.append(Command(words, document, inline, writes))
            words, writes = [], None
        else:
            words.append(token)
        i += 1
    return commands


def documented_commands() -> list[Command]:
    return [c for d in DOCUMENTS for line, inline in shell_lines(d.read_text()) for c in simple_commands(line, d, inline)]


@contextlib.contextmanager
def parse_only(argv0: str | None = None, argv: list[str] | None = None):
    """argparse parses and then raises Parsed; its errors (exit 2) come back as the message it printed."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed(self)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        if argv0 is not None:
            mp.setattr(sys, "argv", [argv0, *(argv or [])])
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                yield
        except SystemExit as exc:
            if exc.code == 0 and {"-h", "--help"} & set(sys.argv if argv0 else []):
                return
            raise AssertionError(f"exit {exc.code}: {err.getvalue().strip().splitlines()[-1:]}") from None


def parsed(run, argv0=None, argv=None) -> None:
    try:
        with parse_only(argv0, argv):
            run()
    except Parsed:
        return
    if argv and {"-h", "--help"} & set(argv):
        return  # it printed its help and exited 0
    raise AssertionError("it did not reach its argument parsing")


def parser_of(run) -> argparse.ArgumentParser:
    """The parser a command would use, found without parsing anything."""
    def capture(self, args=None, namespace=None):
        raise Parsed(self)

    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
            mp.setattr(argparse.ArgumentParser, "parse_args", capture)
            run()
    except Parsed as done:
        return done.parser
    raise AssertionError("it has no argument parser")


def flags_exist(parser: argparse.ArgumentParser, words: list[str]) -> None:
    unknown = [w for w in words if w.startswith("--") and w.split("=")[0] not in parser._option_string_actions]
    assert not unknown, f"no such option: {', '.join(unknown)} (see {parser.prog} --help)"


def check_train(words: list[str], command: Command) -> None:
    from gptmini.cli import train
    from gptmini.config import to_toml

    if command.inline:
        return flags_exist(train.build_parser(), words)
    cfg, flags = train.parse(words)
    if flags.get("print_config") and command.writes:
        Path(command.writes).write_text(to_toml(cfg))


def check_gptmini(words: list[str], command: Command) -> None:
    from gptmini.cli import COMMANDS

    assert words and words[0] in COMMANDS, f"no gptmini command {words[:1]}: choose from {', '.join(COMMANDS)}"
    name, rest = words[0], words[1:]
    if name == "train":
        return check_train(rest, command)
    module = importlib.import_module(COMMANDS[name][0])
    own = rest
    if name == "launch" and "--" in rest:
        own = rest[:rest.index("--")]
        check_train(rest[len(own) + 1:], command)
    if command.inline:
        probe = [*rest, "--"] if name == "launch" and own is rest else rest  # a fragment: `gptmini launch slurm`
        return flags_exist(parser_of(lambda: module.main(probe)), own)
    parsed(lambda: module.main(rest))


def check_script(path: str, args: list[str], command: Command) -> None:
    script = ROOT / path
    assert script.is_file(), f"no script {path}"
    if script.suffix != ".py":
        return
    paths = list(sys.path)
    sys.path[:0] = [str(ROOT), str(script.parent)]
    try:
        parsed(lambda: runpy.run_path(str(script), run_name="__main__"), str(script), args)
    finally:
        sys.path[:] = paths


def check_python(words: list[str], command: Command) -> None:
    if words[0] == "-c":
        compile(words[1], "<python -c>", "exec")
    elif words[0] == "-m" and words[1] == "pytest":
        missing = [w for w in words[2:] if not w.startswith("-") and not (ROOT / w.split("::")[0]).exists()]
        assert not missing, f"no test file {missing}"
    elif words[0] == "-m" and words[1] == "flows.follow":
        from flows import follow

        ns = follow.parse_args(words[2:])
        check_deployment(ns.deployment, follow.parse_params(ns.param, ns.params))
    elif words[0] == "-m":
        module = importlib.import_module(words[1])
        parsed(lambda: module.main(words[2:]))
    elif words[0].startswith(".venv/"):
        pass  # a tool `make` installs into .venv (llama.cpp's converter): its own contract
    else:
        check_script(words[0], words[1:], command)


def check_torchrun(words: list[str], command: Command) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words)
    if args.module:
        assert args.training_script in ("gptmini.train", "gptmini.cli"), f"torchrun -m {args.training_script}"
        rest = args.training_script_args[1:] if args.training_script == "gptmini.cli" else args.training_script_args
        check_train(rest, command)
    else:
        check_script(args.training_script, args.training_script_args, command)


@cache
def deployments() -> dict[str, object]:
    from flows.prepare_data import prepare_data
    from flows.promote import promote_model
    from flows.serve import deployments as made
    from flows.train_gpt import train_gpt

    flows = {f.name: f for f in (train_gpt, promote_model, prepare_data)}
    return {f"{d.flow_name}/{d.name}": flows[d.flow_name] for d in made()}


def check_deployment(name: str, params: dict) -> None:
    known = deployments()
    assert name in known, f"no deployment {name}: the deployments are {', '.join(known)}"
    accepted = inspect.signature(known[name].fn).parameters
    unknown = sorted(set(params) - set(accepted))
    assert not unknown, f"{name} takes no parameter {unknown}: it takes {', '.join(accepted)}"


def check_prefect(words: list[str], command: Command) -> None:
    if words[0] in PREFECT_OWN:
        return
    assert words[:2] == ["deployment", "run"], f"prefect {' '.join(words[:2])}"
    from flows import follow

    values = [words[i + 1] for i, w in enumerate(words) if w in ("--param", "-p")]
    check_deployment(words[2], follow.parse_params(values, None))


@cache
def server_routes() -> frozenset[str]:
    return frozenset(re.findall(r'@app\.(?:get|post)\("([^"]+)"', "".join(
        p.read_text() for p in (ROOT / "gptmini" / "server").glob("*.py"))))


@cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_curl(words: list[str], command: Command) -> None:
    from gptmini.server.schema import ChatRequest, CompletionRequest

    url = next(w for w in words if re.match(r"(http://)?127\.0\.0\.1:", w))
    port, path = re.match(r"(?:http://)?127\.0\.0\.1:(\d+)(/\S*)", url).groups()
    if port == "5001":
        return  # `mlflow models serve`: MLflow's route
    routes = server_routes()
    assert path in routes, f"no route {path}: the server has {sorted(routes)}"
    if "-d" in words:
        body = json.loads(words[words.index("-d") + 1])
        {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest}[path].model_validate(body)


def check_make(words: list[str], command: Command) -> None:
    targets = make_targets()
    wanted = [w for w in words if "=" not in w]
    missing = [w for w in wanted if w not in targets]
    assert not missing, f"no make target {missing}: the targets are {', '.join(sorted(targets))}"


def check_eval(words: list[str], command: Command) -> None:
    script, *args = re.fullmatch(r"\$\((.+)\)", words[0]).group(1).split()
    assert (ROOT / script).is_file(), f"no script {script}"
    assert re.search(rf"^\s*{args[0]}\)", (ROOT / script).read_text(), flags=re.M), f"{script} has no {args[0]}"


def check_kubectl(words: list[str], command: Command) -> None:
    files = [words[i + 1] for i, w in enumerate(words) if w == "-f"]
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert files and not missing, f"no manifest {missing}"


def check_bash(words: list[str], command: Command) -> None:
    script, *args = words
    assert (ROOT / script).is_file(), f"no script {script}"
    if script == "bench/gpu_run.sh":  # its first word, when not a flag, is the output folder
        args = ["--out-dir", *args] if args and not args[0].startswith("-") else args
        check_script("bench/gpu_run.py", args, command)


PROGRAMS = {
    "gptmini": check_gptmini, "python": check_python, "torchrun": check_torchrun, "prefect": check_prefect,
    "curl": check_curl, "make": check_make, "eval": check_eval, "kubectl": check_kubectl, "bash": check_bash,
}


def program(word: str) -> str:
    word = word.removeprefix(".venv/bin/")
    return "python" if word == "python3" else word


COMMANDS = documented_commands()


def test_the_documents_show_commands_of_every_kind():
    """The extraction itself: a regex that stopped matching would make the check below vacuous."""
    kinds = {program(c.words[0]) for c in COMMANDS}
    assert set(PROGRAMS) <= kinds, f"no documented command of {set(PROGRAMS) - kinds}"
    assert len(COMMANDS) > 150


def test_a_command_that_drifted_from_the_code_is_caught(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    bad = [
        "gptmini train --preset demo --data-dir d --stepz 10",
        "gptmini generate --checkpoint runs/demo --top_k 40",
        "torchrun --nproc-per-node 2 -m gptmini.train --preset nano",
        "python bench/bench_data.py --megabytes 32",
        "prefect deployment run train-gpt/demo --param step=100",
        "curl http://127.0.0.1:8000/v1/completions -d '{\"prompt\": \"x\", \"max_token\": 4}'",
        "make tests",
        "frobnicate --now",
    ]
    for line in bad:
        (command,) = simple_commands(line, ROOT / "README.md", inline=False)
        with pytest.raises(Exception):
            check(command)


def check(command: Command) -> None:
    name = program(command.words[0])
    if name in EXTERNAL:
        return
    assert name in PROGRAMS, f"the check does not know the program {command.words[0]!r}: teach it, or list it as external"
    PROGRAMS[name](command.words[1:], command)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_parses(document, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # where `--print-config > demo.toml` writes, for the line that reads it
    monkeypatch.setenv("GPTMINI_STATE", str(tmp_path / "state"))
    failures = []
    for command in (c for c in COMMANDS if c.document == document):
        try:
            check(command)
        except (Exception, pytest.skip.Exception) as exc:  # every failure at once; a skip inside is a failure too
            failures.append(f"{command}\n    {type(exc).__name__}: {str(exc).strip()[:500]}")
    assert not failures, "\n".join(failures)

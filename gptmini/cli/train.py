"""`gptmini train` and `torchrun --nproc-per-node N -m gptmini.train`: the same code.

This is the process around the recipe in `gptmini.trainer`: the config from flags, TOML and presets, the
process group, the signal handlers, the tracker, and how the run ended (summary.json's `status` and the
exit code: 0 completed or preempted, 2 a bad config or bad data, 1 out of memory or another failure).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Any

from gptmini import ending, parallel, registry, tracking, trainer
from gptmini.cli import run
from gptmini.config import PRESETS, SECTIONS, Config, ConfigError, load, section_types, to_toml
from gptmini.data.prepare import PrepareConfig, prepare, read_manifest
from gptmini.errors import Failure, UserError

# Short spellings for the flags people type most (the flow passes these too).
ALIASES: dict[str, tuple[str, ...]] = {
    "data.data_dir": ("--data-dir",),
    "data.sources": ("--sources",),
    "data.batch_size": ("--batch-size",),
    "data.seq_len": ("--seq-len",),
    "optim.lr": ("--lr",),
    "train.out_dir": ("--out", "--out-dir"),
    "train.steps": ("--steps",),
    "train.grad_accum": ("--grad-accum",),
    "train.parallel": ("--parallel",),
    "train.dp_shard": ("--dp-shard",),
    "train.tp": ("--tp",),
    "train.ep": ("--ep",),
    "train.device": ("--device",),
    "train.compile": ("--compile",),
    "train.deterministic": ("--deterministic",),
    "train.seed": ("--seed",),
    "train.resume": ("--resume",),
    "train.init_from": ("--init-from",),
    "data.replay": ("--replay",),
    "tracking.tracking_uri": ("--tracking-uri",),
    "tracking.experiment": ("--experiment",),
    "tracking.run_id": ("--mlflow-run-id",),
    "tracking.run_name": ("--run-name",),
}


class Parser(argparse.ArgumentParser):
    """argparse that raises its error instead of exiting, so a bad flag is recorded in summary.json like any
    other bad config (a caller reading it learns which flag)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise ConfigError(message)


def build_parser(prog: str = "gptmini train") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Train gptmini. Precedence: CLI flags > --config TOML > --preset > defaults. "
        "Run under `torchrun --nproc-per-node N -m gptmini.train` for DDP/FSDP.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="TOML file with [model]/[data]/[optim]/[train]/[tracking] sections")
    p.add_argument("--preset", help=f"named preset: {', '.join(PRESETS)} (default: the TOML's, else {Config.preset})")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit (e.g. to start a file for --config)")
    for section in SECTIONS:
        group = p.add_argument_group(f"[{section}]")
        for key, hint in section_types(section).items():
            dest = f"{section}.{key}"
            flags = (f"--{dest}", *ALIASES.get(dest, ()))
            if typing.get_origin(hint) is list:
                group.add_argument(*flags, dest=dest, nargs="+", metavar="VALUE")
            elif hint is bool:
                group.add_argument(*flags, dest=dest, nargs="?", const="true", metavar="BOOL")
            else:
                group.add_argument(*flags, dest=dest, metavar="VALUE")
    return p


def parse(argv: list[str] | None) -> tuple[Config, dict[str, Any]]:
    """The resolved Config and the flags that are not config fields; raises ConfigError on bad values."""
    ns = vars(build_parser().parse_args(argv))
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in ns.items():
        if "." in dest:
            section, key = dest.split(".", 1)
            overrides.setdefault(section, {})[key] = value
    return load(ns.get("config"), overrides, ns.get("preset")), ns


def parse_args(argv: list[str] | None) -> Config:
    return parse(argv)[0]


def out_dir_of(argv: list[str]) -> str | None:
    """The run folder named on the command line, found even when the rest of it does not parse: where
    summary.json tells a caller how the run ended."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--train.out_dir", *ALIASES["train.out_dir"], dest="out")
    return p.parse_known_args(argv)[0].out


def die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL of torchrun (or of the flow run above
    it) would leave the ranks training on, into the run folder a retry then writes too. On Linux the kernel
    sends us SIGTERM when torchrun dies: a preemption, which checkpoints and exits."""
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def train(argv: list[str]) -> int:
    cfg, flags = parse(argv)
    if flags.get("print_config"):
        print(to_toml(cfg), end="")
        return 0
    if cfg.train.init_from.startswith("models:/"):  # the registry's weights, downloaded once per version
        uri = cfg.train.init_from
        cfg.train.init_from = str(registry.resolve_model_uri(uri, cfg.tracking.tracking_uri))
        print(f"--init-from {uri}: {cfg.train.init_from}", flush=True)
    env = parallel.init_distributed(cfg)
    preempt = trainer.Preemption()
    die_with_launcher()
    try:
        prepare_sources(cfg, env)
        take_data_tokenizer(cfg, env)
        result = trainer.train(cfg, env, preempt, tracking.open_tracker)
    finally:
        preempt.restore()
        parallel.cleanup()
    return ending.EXIT_CODES[result["status"]]


def prepare_sources(cfg: Config, env: parallel.DistEnv) -> None:
    """`--sources`: tokenized first into `--data-dir` (default RUN/data) on rank 0, a no-op when the shards are
    up to date; the trainer then reads prepared data only."""
    if not cfg.data.sources:
        return
    if not cfg.data.data_dir:
        cfg.data.data_dir = str(Path(cfg.train.out_dir) / "data")
    if env.is_main:
        prepare(PrepareConfig(sources=list(cfg.data.sources), out=Path(cfg.data.data_dir),
                              tokenizer=cfg.model.tokenizer))
    parallel.barrier()


def take_data_tokenizer(cfg: Config, env: parallel.DistEnv) -> None:
    """The model takes the tokenizer the shards were written with: a preset names cl100k_base, but data
    prepared with `--tokenizer bpe:8192` needs an 8192-row embedding, not 100352. The trainer is then given a
    config that agrees with its data."""
    manifest = read_manifest(cfg.data.data_dir)
    if manifest["tokenizer"] != cfg.model.tokenizer:
        if env.is_main:
            print(f"note: {cfg.data.data_dir} is tokenized with {manifest['tokenizer']} ({manifest['n_vocab']} ids), "
                  f"not {cfg.model.tokenizer}: the model takes its tokenizer and vocab_size={manifest['vocab_size']}",
                  flush=True)
        cfg.model.tokenizer, cfg.model.vocab_size = manifest["tokenizer"], manifest["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        try:
            return train(argv)
        except Exception as exc:
            status = ending.status_of(exc)
            record_ending(argv, status, str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
            if status == ending.OOM:
                raise Failure(f"out of memory ({str(exc).splitlines()[0][:200]}); lower --batch-size (with "
                              f"--grad-accum to keep the tokens per step) or use --parallel fsdp") from exc
            raise

    return run("gptmini train", body)


def record_ending(argv: list[str], status: str, error: str) -> None:
    """summary.json for a run that ended in an error, in a run folder that exists (a caller such as the flow
    creates it to read how the run ended); a mistyped command never leaves a folder behind."""
    out = out_dir_of(argv)
    if out and Path(out).is_dir() and os.environ.get("RANK", "0") == "0":
        ending.write_error(out, status, error)


def exit_rank(code: int) -> None:
    """End a torchrun rank without running the interpreter's finalization. Gloo's worker threads can still
    be releasing a finished collective's tensors when Python shuts down; that release needs the GIL, which a
    finalizing interpreter no longer hands out, so the thread is torn down and the process aborts
    (std::terminate, exit -6) after a run that completed and saved everything. Everything is written,
    flushed and closed by now, so nothing is lost by skipping finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

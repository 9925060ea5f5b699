"""The training recipe, the same in one process and under torchrun:

    setup (run folder, data, model, optimizer, resume)
    loop { train_step: accumulate micro-batches, clip, step → log → evaluate (keep the best) → checkpoint }
    finish (final weights, summary.json, artifacts)

The caller owns the process: `gptmini.cli.train` parses the config, joins the process group, installs the
signal handlers and chooses the tracker. The trainer reports to a `Tracker` it is handed and never imports
MLflow.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptmini import checkpoint, ending, metrics, parallel
from gptmini.config import Config, ConfigError, to_json, to_toml
from gptmini.data.loader import ReplayLoader, WindowLoader, build_loaders, replay_loader
from gptmini.data.prepare import read_manifest
from gptmini.device import autocast, matmul_dtype, native_bf16, peak_flops
from gptmini.errors import UserError
from gptmini.evaluate import evaluate, token_bytes
from gptmini.ending import COMPLETED, PREEMPTED
from gptmini.files import write_atomic
from gptmini.loss import LossFn, balance_loss, next_token
from gptmini.model import GPTOSSMini
from gptmini.optim import build_optimizer, get_lr
from gptmini.retrain import check_parent, model_dict
from gptmini.tokenizer import Tokenizer, check_vocab, get_tokenizer
from gptmini.weights import load_model, save_pretrained

# The measures of an evaluation that go to the tracker: the same names in summary.json, `gptmini eval`, the
# flow's report and the registry version's tags.
VAL_METRICS = ("val_loss", "val_bpb", "val_perplexity")

class Tracker:
    """What the trainer reports to: this no-op one runs when there is no tracking (and on every rank but 0);
    `gptmini.tracking.MlflowTracker` sends the same calls to MLflow. Used as a context manager, it ends the
    run with `status`, or FAILED (KILLED for Ctrl-C) when the block raises."""

    run_id: str | None = None
    status = "FINISHED"

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None:
            self.status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(self.status)

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, manifest_path: Path) -> None: ...

    def log_model(self, name: str, folder: Path, step: int, metrics: dict[str, float]) -> str | None:
        """Record checkpoint `folder` ("best", "final") with the metrics that describe it; the model's id."""
        return None

    def close(self, status: str) -> None: ...


TrackerFactory = Callable[[Config, Path, bool], Tracker]


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and stops.

    A second SIGINT interrupts at once (an impatient Ctrl-C)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Ranks may see the signal at different steps; stop when any rank has it, all at the same step."""
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(parallel.all_reduce(flag, "max").item())


@dataclass
class TrainState:
    """What a checkpoint must carry besides the tensors to resume exactly."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    best_step: int = -1
    wall_time_s: float = 0.0  # summed over the run and its resumptions
    best: dict[str, float] | None = None  # the best evaluation's measures (val_loss, val_bpb, ...)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val_loss,
                "best_step": self.best_step, "wall_time_s": self.wall_time_s, "best": self.best}


@dataclass
class Run:
    """Everything `setup` builds and the loop uses."""

    cfg: Config
    env: parallel.DistEnv
    dir: Path
    raw_model: GPTOSSMini  # the module itself: its config, counters and FLOP count
    model: nn.Module  # what runs forward and backward: raw_model compiled and wrapped (DDP, FSDP)
    optimizer: torch.optim.Optimizer
    train_loader: WindowLoader | ReplayLoader
    val_loader: WindowLoader | None
    log: metrics.MetricsLog
    state: TrainState
    t_start: float
    nbytes: torch.Tensor  # UTF-8 bytes of each token id, for bits per byte
    tokenizer_file: Path | None  # a trained tokenizer's file, saved with every checkpoint and weights folder
    precision: str  # what the training step's matmuls run in: train.precision resolved for this device
    plotted_at: float = field(default_factory=time.monotonic)  # when plots/ was last drawn (or the run began)

    def say(self, *parts: Any) -> None:
        if self.env.is_main:
            print(*parts, flush=True)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.seq_len * self.cfg.train.grad_accum * self.env.data_world

    def wall_time(self) -> float:
        return self.state.wall_time_s + time.time() - self.t_start


def step_precision(precision: str, env: parallel.DistEnv) -> str:
    """bf16 where it was asked for and the device multiplies bf16 in hardware; asked for on a CPU without,
    it would only be slower (oneDNN emulates it), so the step runs fp32 and says so."""
    if precision == "bf16" and not native_bf16(env.device):
        if env.is_main:
            print("note: train.precision = 'bf16' but this CPU has no bf16 units (AVX512-BF16 or AMX), where bf16 "
                  "autocast is slower than fp32: training runs fp32", flush=True)
        return "fp32"
    return precision


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def unigram_entropy(segments: list[np.ndarray]) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of the best model that ignores context."""
    size = max(int(s.max()) for s in segments if len(s)) + 1
    counts = sum(np.bincount(s, minlength=size) for s in segments)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# Setup


def setup(cfg: Config, env: parallel.DistEnv) -> tuple[Run, dict[str, Any] | None]:
    """Build the run on prepared data (`cfg.data.data_dir`, whose tokenizer the config's model names:
    `gptmini train` sees to it), resumed from its last checkpoint when asked. Returns it with the RNG state to
    restore just before the first step (None for a fresh run, or one resumed at another world size)."""
    t_start = time.time()
    resume_from = resume_point(cfg)
    set_deterministic(cfg.train.deterministic)
    tokenizer = data_tokenizer(cfg)
    try:
        check_vocab(cfg.model.vocab_size, tokenizer)
    except UserError as exc:
        raise ConfigError(f"model.vocab_size: {exc}") from None
    parent = load_parent(cfg, env) if cfg.train.init_from else None
    train_loader, val_loader = folder_loaders(cfg, env)
    # Same seed on every rank: FSDP2, TP and EP shard each rank's own init, so the inits must agree.
    seed_everything(cfg.train.seed)
    raw_model = GPTOSSMini(cfg.model)
    if parent is not None:
        raw_model.load_state_dict(parent.state_dict())
        del parent
    return start_run(cfg, env, raw_model, train_loader, val_loader, tokenizer, resume_from, t_start)


def folder_loaders(cfg: Config, env: parallel.DistEnv) -> tuple[WindowLoader, WindowLoader | None]:
    # Validation reads windows of the model's whole context, as `gptmini eval` and the gate do, so a
    # checkpoint's val_loss and val_bpb are the same numbers wherever they are measured.
    train_loader, val_loader = build_loaders(
        cfg.data.data_dir, cfg.seq_len, cfg.stride, cfg.data.batch_size, env.data_rank, env.data_world,
        seed=cfg.train.seed, device=env.device, vocab_size=cfg.model.vocab_size, val_seq_len=cfg.model.max_seq_len,
    )
    if cfg.data.replay is not None:
        train_loader = replay_loader(train_loader, cfg.data.replay, cfg.seq_len, cfg.stride, cfg.data.batch_size,
                                     env.data_rank, env.data_world, cfg.train.seed, cfg.data.data_dir)
    return train_loader, val_loader


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from, resolved before the run folder is touched: a fresh run must not
    clobber one."""
    run_dir = Path(cfg.train.out_dir)
    resume_from = checkpoint.resolve_resume(cfg.train.resume, run_dir)
    if cfg.train.resume == "none" and checkpoint.latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume auto to continue it, or another --out")
    return resume_from


def start_run(cfg: Config, env: parallel.DistEnv, raw_model: GPTOSSMini, train_loader: WindowLoader,
              val_loader: WindowLoader | None, tokenizer: Tokenizer, resume_from: Path | None,
              t_start: float) -> tuple[Run, dict[str, Any] | None]:
    """The run around a built model and its data: the model on the device (compiled and wrapped as asked),
    the optimizer, the run folder's config files, the checkpoint resumed from. `setup` builds the model
    from the config; `gptmini.api.GPTTrainer` hands in the user's own."""
    precision = step_precision(cfg.train.precision, env)
    raw_model = raw_model.to(env.device)
    raw_model.set_expert_kernel(compute_dtype=matmul_dtype(env.device, precision))  # before compile traces it
    if cfg.train.compile:
        parallel.compile_model(raw_model, "blocks", backend=cfg.train.compile_backend)
    model = parallel.wrap(raw_model, cfg.train.parallel, env)
    optimizer = build_optimizer(model, cfg.optim)
    seed_everything(cfg.train.seed + env.rank)  # dropout masks differ per rank

    run_dir = Path(cfg.train.out_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ending.clear(run_dir)
        write_atomic(run_dir / "config.toml", to_toml(cfg))
        write_atomic(run_dir / "train_config.json", to_json(cfg))
    run = Run(cfg, env, run_dir, raw_model, model, optimizer, train_loader, val_loader,
              metrics.MetricsLog(run_dir / "metrics.jsonl"), TrainState(), t_start,
              token_bytes(tokenizer, cfg.model.vocab_size, env.device), tokenizer.file, precision)
    rng = resume(run, resume_from) if resume_from is not None else None
    if env.is_main:
        run.log.truncate_after(run.state.step)  # a fresh run starts an empty file; a resumed one drops lost steps
    parallel.barrier()
    return run, rng


def data_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of the shards, which must be the model's: its ids index the embedding."""
    written_with = read_manifest(cfg.data.data_dir)["tokenizer"]
    if written_with != cfg.model.tokenizer:
        raise ConfigError(f"model.tokenizer = {cfg.model.tokenizer!r}, but {cfg.data.data_dir} is tokenized with "
                          f"{written_with!r}; set model.tokenizer (and vocab_size) to the data's, as `gptmini train` does")
    return get_tokenizer(cfg.model.tokenizer, cfg.data.data_dir)


def load_parent(cfg: Config, env: parallel.DistEnv) -> GPTOSSMini:
    """The weights to start from (`train.init_from`, a local folder), checked to be this run's model reading the
    data's tokens, before anything else is built. The optimizer starts afresh, and the schedule warms up and
    decays again over this run (Ibrahim et al. 2024: re-warming and re-decaying the learning rate)."""
    parent, _ = load_model(cfg.train.init_from)
    check_parent(model_dict(cfg.model), model_dict(parent.config), cfg.model.tokenizer, cfg.train.init_from)
    if env.is_main:
        print(f"init from {cfg.train.init_from}: {parent.num_params() / 1e6:.2f}M parameters", flush=True)
    return parent


def resume(run: Run, path: Path) -> dict[str, Any] | None:
    saved, rank_state = checkpoint.load_checkpoint(path, run.model, run.optimizer, run.env)
    run.state = TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"], best_val_loss=saved["best_val_loss"],
                           best_step=saved["best_step"], wall_time_s=saved["wall_time_s"], best=saved.get("best"))
    # The sampler's position is global, so it restores at any world size; the RNG streams only at the same size.
    run.train_loader.load_state_dict(saved["sampler"])
    if rank_state is None:
        run.say(f"note: {path} was written by {saved['world_size']} rank(s), this run has {run.env.world_size}: "
                f"weights, optimizer and data position carry over, RNG streams start anew")
    run.say(f"resumed from {path} at step {run.state.step} ({run.state.tokens_seen:,} tokens seen)")
    return rank_state["rng"] if rank_state is not None else None


# The step, logging, evaluation and checkpoints


def train_step(run: Run, lr: float, loss_fn: LossFn = next_token) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches, each scored by `loss_fn` plus the MoE balance term;
    returns (mean loss, grad norm) on the device."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = [run.train_loader.next_batch() for _ in range(run.cfg.train.grad_accum)]
    step_tokens = sum(y.numel() for _, y in micro)
    step_loss = torch.zeros((), device=run.env.device)
    for i, (x, y) in enumerate(micro):
        # Token-weighted: the accumulated gradient is exactly the big batch's mean-loss gradient.
        weight = y.numel() / step_tokens
        with (parallel.grad_sync(run.model, enabled=i == len(micro) - 1), autocast(run.env.device, run.precision),
              parallel.loss_context(run.model)):
            mean = loss_fn(run.model, x, y) + balance_loss(run.raw_model)
            (mean * weight).backward()
        step_loss += parallel.local(mean.detach()) * weight
    parallel.sync_expert_grads(run.model, run.env)
    grad_norm = parallel.clip_grad_norm(run.model, run.cfg.optim.grad_clip or math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    run.state.tokens_seen += step_tokens * run.env.data_world
    return step_loss, grad_norm


class Meter:
    """Sums the loss on the device between log lines, so logging is the loop's only host sync."""

    def __init__(self, run: Run):
        self.run = run
        self.peak = peak_flops(run.env.device)
        self.flops_per_token = run.raw_model.flops_per_token(run.cfg.seq_len)
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps = torch.zeros((), device=self.run.env.device), 0
        self.t, self.tokens = time.time(), self.run.state.tokens_seen

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def record(self, lr: float, grad_norm: torch.Tensor) -> dict[str, Any]:
        """The train record: `loss` is the mean over the steps since the last record and over the ranks."""
        run, env = self.run, self.run.env
        parallel.all_reduce(self.loss, env=env)
        now = time.time()
        rec: dict[str, Any] = {
            "kind": "train", "step": run.state.step, "loss": self.loss.item() / (env.data_world * self.steps),
            "lr": lr, "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
            "tokens": run.state.tokens_seen,
            "tokens_per_s": (run.state.tokens_seen - self.tokens) / max(now - self.t, 1e-9),
            "step_s": (now - self.t) / self.steps,
            "aux_loss": float(run.raw_model.last_aux_loss.detach()),
        }
        if self.peak:
            rec["mfu"] = rec["tokens_per_s"] * self.flops_per_token / (self.peak * env.world_size)
        if run.raw_model.last_expert_load is not None:
            load = run.raw_model.last_expert_load.float()
            rec["expert_balance"] = float(load.max() / load.mean().clamp(min=1e-9))
        self.reset()
        return rec


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def log_line(step: int, total: int, rec: dict[str, Any]) -> str:
    parts = [f"step {step:>6}/{total}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
             f"grad {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:,.0f} tok/s"]
    if "eta_s" in rec:
        parts.append(f"eta {duration(rec['eta_s'])}")
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if "expert_balance" in rec:
        parts.append(f"experts max/mean {rec['expert_balance']:.2f}")
    return " | ".join(parts)


def log_train(run: Run, tracker: Tracker, rec: dict[str, Any]) -> None:
    # The time left at this stretch's speed (evaluations and checkpoints included, since the last line).
    rec["eta_s"] = (run.cfg.train.steps - rec["step"]) * rec.pop("step_s")
    if run.env.is_main:
        run.log.log(rec)
        tracker.log_metrics({k: v for k, v in rec.items() if k not in ("kind", "step")}, rec["step"])
        run.say(log_line(rec["step"], run.cfg.train.steps, rec))
    if not math.isfinite(rec["loss"]):
        raise FloatingPointError(
            f"loss is {rec['loss']} at step {rec['step']}; lower --lr (now {run.cfg.optim.lr}) or raise "
            f"--optim.warmup_steps, then --resume auto from the last checkpoint"
        )


PLOT_EVERY_S = 30.0


def validate(run: Run, tracker: Tracker, final: bool) -> dict[str, float] | None:
    """Periodic evaluations take eval_batches per rank; the final one the whole val split. A new best
    val loss exports checkpoints/best/."""
    if run.val_loader is None:
        return None
    result = evaluate(run.model, run.val_loader, run.nbytes, None if final else run.cfg.train.eval_batches, run.env)
    step = run.state.step
    if run.env.is_main:
        run.log.log({"kind": "val", "step": step, **result})
        tracker.log_metrics({k: result[k] for k in VAL_METRICS}, step)
        run.say(f"step {step:>6} | val loss {result['val_loss']:.4f} | {result['val_bpb']:.4f} bits/byte | "
                f"ppl {result['val_perplexity']:.1f} | {result['val_tokens']:,} tokens")
    if result["val_loss"] < run.state.best_val_loss:
        run.state.best_val_loss, run.state.best_step = result["val_loss"], step
        run.state.best = {"step": step, **result}
        export_weights(run, run.dir / "checkpoints" / "best", {"step": step, **result})
    # Drawing and uploading the plots costs about a second and a half: refreshed at most every PLOT_EVERY_S, and
    # by `finish` at the end, so short runs are not slowed by them.
    if run.env.is_main and not final and time.monotonic() - run.plotted_at >= PLOT_EVERY_S:
        for png in metrics.plot(run.log.read(), run.dir / "plots"):
            tracker.log_artifact(png, "plots")
        run.plotted_at = time.monotonic()
    return result


def save(run: Run) -> Path:
    """Collective: a resumable checkpoint of this step."""
    trainer_state = {**run.state.to_dict(), "wall_time_s": run.wall_time(), "sampler": run.train_loader.state_dict()}
    return checkpoint.save_checkpoint(
        run.dir, run.state.step, run.model, run.optimizer, trainer_state=trainer_state,
        rank_state={"rng": checkpoint.rng_state()}, config_json=to_json(run.cfg), config_toml=to_toml(run.cfg),
        env=run.env, keep_last=run.cfg.train.keep_last, tokenizer_file=run.tokenizer_file,
    )


def export_weights(run: Run, out: Path, extra: dict[str, Any]) -> None:
    """Collective: plain safetensors weights (best/, final/) that `weights.load_model` reads."""
    if parallel.sharded(run.model):
        full = checkpoint.full_state_dict(run.model)  # collective: every rank gathers
        if run.env.is_main:
            plain = GPTOSSMini(run.cfg.model)
            plain.load_state_dict(full)
            save_pretrained(plain, out, metadata=extra, tokenizer_file=run.tokenizer_file)
    elif run.env.is_main:
        save_pretrained(run.raw_model, out, metadata=extra, tokenizer_file=run.tokenizer_file)
    parallel.barrier()


def should_stop(run: Run, preempt: Preemption) -> bool:
    if run.env.world_size == 1:
        return preempt.requested
    # Agreeing costs a collective: on GPU only at log steps, where the loop syncs anyway.
    at_sync = run.env.device.type == "cpu" or run.state.step % run.cfg.train.log_every == 0
    return at_sync and preempt.agreed(run.env.device)


# The end of a run


def summary(run: Run, status: str, last_val: dict[str, float] | None, unigram: float | None,
            tracker: Tracker) -> dict[str, Any]:
    state, d = run.state, run.dir
    return {
        "status": status, "steps": state.step, "tokens": state.tokens_seen, "wall_time_s": run.wall_time(),
        # The last evaluation (the whole val split when the run completed) and the best one, under the names
        # evaluate() gives them.
        "final": {"step": state.step, **last_val} if last_val else None,
        "best": state.best,
        "best_step": state.best_step, "unigram_entropy": unigram, "world_size": run.env.world_size,
        "parallel": run.cfg.train.parallel, "mesh": run.env.dims.describe(), "n_params": run.raw_model.num_params(),
        "n_active_params": run.raw_model.num_active_params(), "mlflow_run_id": tracker.run_id,
        "paths": {"run": str(d), "metrics": str(d / "metrics.jsonl"), "config": str(d / "config.toml"),
                  "plots": str(d / "plots"), "last_checkpoint": str(checkpoint.latest_checkpoint(d)),
                  "best": str(d / "checkpoints" / "best") if state.best_step >= 0 else None,
                  "final": str(d / "final") if status == COMPLETED else None},
    }


def finish(run: Run, tracker: Tracker, status: str, last_val: dict[str, float] | None,
           unigram: float | None) -> dict[str, Any]:
    """final/ (when completed), summary.json, the plots and the artifacts."""
    if status == COMPLETED:
        export_weights(run, run.dir / "final", {"step": run.state.step, **(last_val or {})})
    result = summary(run, status, last_val, unigram, tracker)
    if not run.env.is_main:
        return result
    records = run.log.read()
    if records:
        metrics.plot(records, run.dir / "plots")
    # The weights go to the tracker as models (MLflow 3 LoggedModels, with their val measures), or, when it
    # keeps no models, as plain artifacts of the run.
    weights = {"best": (run.dir / "checkpoints" / "best", run.state.best)}
    if status == COMPLETED and last_val:
        weights["final"] = (run.dir / "final", {"step": run.state.step, **last_val})
    result["mlflow_models"] = {}
    for name, (folder, measured) in weights.items():
        if measured is None:
            continue
        if name == "final" and result["mlflow_models"] and run.state.best_step == run.state.step:
            result["mlflow_models"]["final"] = result["mlflow_models"]["best"]  # the same weights: one model
            continue
        model_id = tracker.log_model(name, folder, measured["step"], {k: measured[k] for k in VAL_METRICS})
        if model_id:
            result["mlflow_models"][name] = model_id
        else:
            tracker.log_artifact(folder, "checkpoints/best" if name == "best" else "final")
    ending.write(run.dir, result)
    for name in ("plots/loss.png", "plots/lr.png"):
        if (run.dir / name).is_file():
            tracker.log_artifact(run.dir / name, "plots")
    tracker.log_artifact(run.dir / "config.toml")
    tracker.log_artifact(ending.path(run.dir))
    val = (f"val loss {last_val['val_loss']:.4f}, {last_val['val_bpb']:.4f} bits/byte" if last_val else "no val split")
    run.say(f"done: {status} at step {run.state.step}, {run.state.tokens_seen:,} tokens, {duration(result['wall_time_s'])}; "
            f"{val}{f' (unigram baseline {unigram:.3f} nats)' if unigram is not None else ''}; "
            f"summary {ending.path(run.dir)}")
    return result


# The recipe


def train(cfg: Config, env: parallel.DistEnv, preempt: Preemption,
          open_tracker: TrackerFactory = lambda cfg, run_dir, is_main: Tracker()) -> dict[str, Any]:
    run, rng = setup(cfg, env)
    with open_tracker(cfg, run.dir, env.is_main) as tracker:
        unigram = None
        if env.is_main:
            manifest = run.train_loader.dataset.tokens.manifest
            unigram = unigram_entropy(run.train_loader.dataset.tokens.segments)
            n_params, n_active = run.raw_model.num_params(), run.raw_model.num_active_params()
            tracker.log_params({**cfg.flat(), "run.world_size": env.world_size, "run.n_params": n_params,
                                "run.n_active_params": n_active, "run.tokens_per_step": run.tokens_per_step,
                                "run.data_manifest_key": manifest.get("input_key", "")})
            tracker.log_dataset(Path(cfg.data.data_dir) / "manifest.json")
            run.say(f"gptmini: {n_params / 1e6:.2f}M params ({n_active / 1e6:.2f}M active) | {env.dims.describe()} on "
                    f"{env.world_size} x {env.device.type} | {run.tokens_per_step:,} tokens/step | train split "
                    f"unigram entropy {unigram:.3f} nats | run {run.dir}")
        if rng is not None:
            checkpoint.set_rng_state(rng)  # last, so nothing between here and the loop draws from it
        status, last_val = loop(run, tracker, preempt)
        return finish(run, tracker, status, last_val, unigram)


def loop(run: Run, tracker: Tracker, preempt: Preemption) -> tuple[str, dict[str, float] | None]:
    """Steps up to cfg.train.steps: log, evaluate (keeping the best), checkpoint, stop at a preemption.
    Returns how the stretch ended and its last evaluation."""
    cfg = run.cfg
    run.model.train()
    meter, last_val, status = Meter(run), None, COMPLETED
    while run.state.step < cfg.train.steps:
        lr = get_lr(run.state.step, cfg.optim, cfg.train.steps)
        loss, grad_norm = train_step(run, lr)
        meter.add(loss)
        step, done = run.state.step, run.state.step == cfg.train.steps
        if step % cfg.train.log_every == 0 or done:
            log_train(run, tracker, meter.record(lr, grad_norm))
        if step % cfg.train.eval_every == 0 or done:
            last_val = validate(run, tracker, final=done)
        stop = should_stop(run, preempt)
        if step % cfg.train.ckpt_every == 0 or done or stop:
            save(run)
        if stop and not done:
            status = PREEMPTED
            run.say(f"{preempt.signal_name}: saved checkpoint at step {step}; exiting (resume with --resume auto)")
            tracker.status = "KILLED"
            break
    return status, last_val

"""Training configuration: one dataclass per concern, a TOML file, and command-line overrides.

Precedence, lowest to highest (torchtitan's "CLI > TOML > defaults", with named presets in between):

    dataclass defaults  <  preset (--preset, or `preset = ...` in the TOML)  <  TOML file (--config)  <  CLI flags

Every field is reachable from the command line as `--SECTION.FIELD VALUE` (e.g. `--optim.lr 1e-3`,
`--model.n_layers 2`), and the common ones also have short spellings (`--steps`, `--data-dir`, ...).
The resolved config is plain data (str, int, float, bool, lists), so it round-trips through TOML,
JSON and MLflow params unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gptmini.device import DEVICES, PRECISIONS

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
from gptmini.errors import UserError
from gptmini.model import ModelConfig
from gptmini.tokenizer import check_tokenizer_name
from gptmini.redact import redact_tree

PARALLEL_MODES = ("none", "ddp", "fsdp")


class ConfigError(UserError):
    """A config value the user must fix; the message names the value and the fix."""


@dataclass
class DataConfig:
    data_dir: str = ""  # a `gptmini prepare` output folder (manifest.json + Arrow shards)
    # Convenience: prepare these sources into data_dir (or OUT_DIR/data) before training.
    sources: list[str] = field(default_factory=list)
    seq_len: int = 0  # 0: the model's max_seq_len
    stride: int = 0  # 0: seq_len, i.e. non-overlapping windows
    batch_size: int = 8  # windows per micro-batch per rank
    shuffle: bool = True
    # None: batches from the whole train split. A fraction r in [0, 1): batches from the documents that are new
    # since the dataset named by `gptmini prepare --since`, with a share r of their windows replayed from the
    # earlier documents (continual pre-training's replay, against forgetting).
    replay: float | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # cosine decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # matrices only; norms and biases are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    out_dir: str = "runs/gptmini"
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    parallel: str = "none"  # none | ddp | fsdp: how the data-parallel ranks hold the weights
    # The device mesh (docs/scaling.md): dp_shard x tp x ep (x the DDP replicas) = the world size.
    dp_shard: int = 0  # ranks FSDP shards over; 0: every data rank under fsdp, none otherwise
    tp: int = 1  # tensor + sequence parallel degree (within a node)
    ep: int = 1  # expert parallel degree: the experts are split over this many ranks
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # the step's matmuls: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    # torch.compile's backend: inductor generates kernels; aot_eager and eager trace the graphs (dynamo, and
    # AOTAutograd for aot_eager) but run them as they are: seconds instead of minutes on CPU, to check a run.
    compile_backend: str = "inductor"
    deterministic: bool = False  # bit-exact resume on CPU (torch.use_deterministic_algorithms)
    seed: int = 1337
    log_every: int = 10  # the only steps that sync the host with the GPU
    eval_every: int = 100
    eval_batches: int = 20  # per rank
    ckpt_every: int = 100
    keep_last: int = 3
    resume: str = "none"  # none | auto | PATH to a checkpoint folder
    # Start from these weights instead of a random init: a run folder, a weights folder, a checkpoint folder or
    # models:/NAME@ALIAS. The model config and the data's tokenizer must be the parent's; the learning rate
    # warms up and decays again over this run (optimizer state starts afresh).
    init_from: str = ""


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "": $MLFLOW_TRACKING_URI; neither set: tracking is off
    experiment: str = "gptmini"
    run_id: str = ""  # "": $MLFLOW_RUN_ID; set: log into the caller's run and never end it
    run_name: str = ""
    system_metrics: bool = True


@dataclass
class Config:
    preset: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.max_seq_len

    @property
    def stride(self) -> int:
        return self.data.stride or self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"optim.lr": 3e-4, ...}`: the shape MLflow params want."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out


SECTIONS = ("model", "data", "optim", "train", "tracking")

# The named presets, model and training together: the one place they are written. `gptmini train --preset
# NAME --print-config` writes one out as a TOML file to copy and edit.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The seed notebook's config dict, verbatim. 50304 is GPT-2's 50257 padded to a multiple of 128.
    "seed": {
        "model": {"tokenizer": "gpt2"},
        "data": {"seq_len": 1024, "batch_size": 16},
        "optim": {"lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 1000},
        "train": {"steps": 20000, "grad_accum": 4, "log_every": 50, "eval_every": 1000, "ckpt_every": 1000},
    },
    # The seed's demonstration model (256 dim, 4 layers) on cl100k_base (100277 padded to 100352), sized to
    # train for a few minutes on a laptop CPU. Small batches, many steps: on 2 CPU cores the 100k-row output
    # layer costs most of each token, so the demo gets the most learning per token (three quarters of a pass
    # over the embedded corpus, which leaves nothing for dropout to regularise). 300 steps keep `make demo`
    # within 10 minutes of a 2-core VM, install included. bf16 autocast: 1.25x the steps per second on a CPU
    # with bf16 units at the same bits per byte (fp32 on one without).
    "demo": {
        "model": {"vocab_size": 100352, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2,
                  "d_ff": 1024, "num_experts": 4, "top_k": 2, "max_seq_len": 256, "dropout": 0.0},
        "data": {"seq_len": 64, "batch_size": 4},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20},
        "train": {"steps": 300, "log_every": 10, "eval_every": 50, "eval_batches": 4, "ckpt_every": 100,
                  "precision": "bf16"},
    },
    # For tests: every feature on (GQA, MoE), as small as the cl100k vocabulary allows.
    "tiny": {
        "model": {"vocab_size": 100352, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "d_ff": 128, "num_experts": 4, "top_k": 2, "max_seq_len": 128, "dropout": 0.0},
        "data": {"seq_len": 32, "batch_size": 4},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"steps": 20, "log_every": 1, "eval_every": 10, "eval_batches": 2, "ckpt_every": 10},
    },
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named preset, with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name]["model"], **overrides})


def section_types(section: str) -> dict[str, Any]:
    return typing.get_type_hints(typing.get_type_hints(Config)[section])


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Check one TOML/CLI value against its field's type; CLI values arrive as strings."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(where, value, next(a for a in args if a is not type(None)))
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(where, v, args[0]) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{where} = {value!r} is not a valid {name}; give a {name} value")


def apply_overrides(cfg: Config, overrides: dict[str, Any], origin: str) -> None:
    """Set `{section: {field: value}}` onto cfg, rejecting unknown keys by name."""
    for section, values in overrides.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(
                f"{origin}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)} (and top-level `preset`)"
            )
        hints = section_types(section)
        target = getattr(cfg, section)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"{origin}: unknown key {section}.{key}; valid keys in [{section}]: {', '.join(hints)}"
                )
            setattr(target, key, _coerce(f"{origin}: {section}.{key}", value, hints[key]))


def from_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(preset=name)
    apply_overrides(cfg, PRESETS[name], f"preset {name!r}")
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing TOML file to --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML ({exc}); fix the syntax") from None


def load(toml_path: str | Path | None = None, cli: dict[str, dict[str, Any]] | None = None,
         preset: str | None = None) -> Config:
    """Resolve a Config: defaults < preset < TOML < CLI (see the module docstring)."""
    data = read_toml(toml_path) if toml_path else {}
    cfg = from_preset(preset or data.get("preset") or Config.preset)
    apply_overrides(cfg, data, str(toml_path))
    apply_overrides(cfg, cli or {}, "command line")
    validate(cfg)
    return cfg


def validate(cfg: Config, need_data: bool = True) -> None:
    """Every value, checked together; `need_data=False` for a caller that hands the data in itself
    (`gptmini.api.GPTTrainer`)."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    if t.parallel not in PARALLEL_MODES:
        raise ConfigError(f"train.parallel = {t.parallel!r}; choose one of: {', '.join(PARALLEL_MODES)}")
    if t.device not in DEVICES:
        raise ConfigError(f"train.device = {t.device!r}; choose one of: {', '.join(DEVICES)}")
    if t.compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"train.compile_backend = {t.compile_backend!r}; choose one of: {', '.join(COMPILE_BACKENDS)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision = {t.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    for name, value in (("train.steps", t.steps), ("train.grad_accum", t.grad_accum),
                        ("data.batch_size", d.batch_size), ("train.log_every", t.log_every),
                        ("train.eval_every", t.eval_every), ("train.eval_batches", t.eval_batches),
                        ("train.ckpt_every", t.ckpt_every), ("train.keep_last", t.keep_last)):
        if value < 1:
            raise ConfigError(f"{name} = {value}; it must be a positive integer")
    if not 0 < cfg.seq_len <= cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len = {cfg.seq_len} must be in 1..model.max_seq_len ({cfg.model.max_seq_len}); "
            f"lower it or raise model.max_seq_len"
        )
    if cfg.stride < 1:
        raise ConfigError(f"data.stride = {d.stride}; it must be positive (0 means seq_len)")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr = {o.min_lr} must be between 0 and optim.lr ({o.lr})")
    if d.replay is not None and not 0.0 <= d.replay < 1.0:
        raise ConfigError(f"data.replay = {d.replay} must be in [0, 1) (e.g. 0.25: a quarter of each batch from "
                          f"the earlier documents), or none to train on the whole train split")
    if o.warmup_steps < 0 or o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
    if need_data and not d.data_dir and not d.sources:
        raise ConfigError("no training data: pass --data-dir DIR (a `gptmini prepare` output) or --sources SRC...")
    try:  # ModelConfig checks itself on construction; the overrides above were set field by field
        ModelConfig(**dataclasses.asdict(cfg.model))
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    try:
        check_tokenizer_name(cfg.model.tokenizer)
    except UserError as exc:
        raise ConfigError(f"model.tokenizer: {exc}") from None


def to_toml(cfg: Config) -> str:
    """TOML has no null: None fields are left out and fall back to the preset when read back.

    This readable copy is logged to MLflow, so credentials in URLs (sources, tracking URI) are masked."""
    def drop_none(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v is not None}

    doc: dict[str, Any] = {"preset": cfg.preset}
    for section in SECTIONS:
        doc[section] = redact_tree(drop_none(dataclasses.asdict(getattr(cfg, section))))
    # Imported here: only writing TOML needs it, and the GPU machines that run bench/ (through
    # model_preset) do not install it.
    import tomli_w

    return tomli_w.dumps(doc)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved as JSON (checkpoints keep it that way: JSON has null, TOML does not)."""
    cfg = from_preset(data.get("preset", Config.preset))
    apply_overrides(cfg, data, "saved config")
    return cfg


def to_json(cfg: Config) -> str:
    """train_config.json, saved in the run folder and in every checkpoint (folders people copy and share):
    credentials in source URLs and the tracking URI are masked, as in config.toml. Nothing reads those two
    fields back from it (resuming takes them from the command line)."""
    return json.dumps(redact_tree(cfg.to_dict()), indent=2, sort_keys=True)

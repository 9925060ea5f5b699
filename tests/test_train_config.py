"""Training config and the loop's pure parts: precedence, validation, schedule, optimizer groups."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptmini import config, parallel, trainer
from gptmini.cli.train import parse_args, take_data_tokenizer
from gptmini.config import ConfigError
from gptmini.data.prepare import read_manifest
from gptmini.device import autocast, native_bf16
from gptmini.model import GPTOSSMini
from gptmini.optim import build_optimizer, get_lr

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_is_cli_over_toml_over_preset_over_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "tiny"\n[optim]\nlr = 0.01\nwarmup_steps = 7\n[data]\ndata_dir = "d"\n')
    cfg = parse_args(["--config", str(toml), "--optim.lr", "0.02", "--steps", "5"])
    assert cfg.preset == "tiny" and cfg.model == config.model_preset("tiny")  # the TOML's preset
    assert cfg.optim.lr == 0.02  # CLI beats TOML
    assert cfg.optim.warmup_steps == 7  # TOML beats preset (2)
    assert cfg.train.steps == 5
    assert cfg.data.batch_size == config.PRESETS["tiny"]["data"]["batch_size"]  # preset beats default
    assert cfg.optim.beta2 == config.OptimConfig().beta2  # default
    assert parse_args(["--config", str(toml), "--preset", "demo"]).model == config.model_preset("demo")


def test_cli_sets_model_fields_and_optional_values():
    cfg = parse_args(["--preset", "tiny", "--data-dir", "d", "--model.n_layers", "3",
                             "--model.sliding_window", "8", "--compile", "--deterministic", "false"])
    assert cfg.model.n_layers == 3 and cfg.model.sliding_window == 8
    assert cfg.train.compile and not cfg.train.deterministic
    assert parse_args(["--preset", "tiny", "--data-dir", "d", "--model.sliding_window", "none"]).model.sliding_window is None


@pytest.mark.parametrize("argv, words", [
    (["--preset", "nope", "--data-dir", "d"], ["nope", "tiny"]),
    (["--preset", "tiny", "--data-dir", "d", "--parallel", "tp"], ["train.parallel", "fsdp"]),
    (["--preset", "tiny", "--data-dir", "d", "--steps", "ten"], ["train.steps", "int"]),
    (["--preset", "tiny", "--data-dir", "d", "--steps", "0"], ["train.steps", "positive"]),
    (["--preset", "tiny", "--data-dir", "d", "--seq-len", "4096"], ["seq_len", "max_seq_len"]),
    (["--preset", "tiny"], ["--data-dir"]),
])
def test_bad_values_name_the_value_and_the_fix(argv, words):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unknown_toml_key_is_rejected_by_name(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[optim]\nlearning_rate = 1e-3\n')
    with pytest.raises(ConfigError, match="optim.learning_rate.*valid keys"):
        config.load(toml, {"data": {"data_dir": "d"}})


def test_resolved_config_round_trips_through_toml_and_json(tmp_path):
    cfg = parse_args(["--preset", "demo", "--data-dir", "d", "--lr", "0.005", "--sources", "a", "b"])
    path = tmp_path / "config.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg
    assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["tiny", "demo", "seed"])
def test_print_config_writes_a_file_that_loads_back_as_the_preset(name, tmp_path, capsys):
    from gptmini.cli.train import main

    assert main(["--preset", name, "--sources", "embedded:python-docs", "--print-config"]) == 0
    path = tmp_path / f"{name}.toml"
    path.write_text(capsys.readouterr().out)
    assert config.load(path) == config.load(cli={"data": {"sources": ["embedded:python-docs"]}}, preset=name)
    assert config.load(path).model == config.model_preset(name)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = config.OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert get_lr(0, cfg, 110) == pytest.approx(0.1)
    assert get_lr(9, cfg, 110) == pytest.approx(1.0)
    assert get_lr(60, cfg, 110) == pytest.approx(0.55)  # halfway through the cosine
    assert get_lr(110, cfg, 110) == pytest.approx(0.1)
    lrs = [get_lr(s, cfg, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_applies_to_matrices_only():
    model = GPTOSSMini(config.model_preset("tiny"))
    opt = build_optimizer(model, config.OptimConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert not math.isnan(decayed["lr"])


@pytest.mark.parametrize("argv, status, words", [
    (["--data-dir", "{tmp}/nothing"], "bad_data", "no manifest.json"),
    (["--data-dir", "{tmp}/nothing", "--steps", "0"], "bad_config", "train.steps = 0"),
    (["--data-dir", "{tmp}/nothing", "--stepz", "3"], "bad_config", "--stepz"),
])
def test_a_failed_run_says_how_it_ended_in_summary_json_and_its_exit_code(argv, status, words, tmp_path, capsys):
    """What a caller (the flow) reads instead of the output: bad input is exit 2 and named in summary.json."""
    from gptmini.cli.train import main

    out = tmp_path / "run"
    out.mkdir()
    assert main(["--preset", "tiny", "--out", str(out), *[a.format(tmp=tmp_path) for a in argv]]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == status and summary["exit_code"] == 2 and words in summary["error"]
    assert words in capsys.readouterr().err


def test_bf16_runs_the_step_under_autocast_where_the_cpu_has_bf16_units(capsys):
    env = parallel.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    assert trainer.step_precision("fp32", env) == "fp32" and trainer.step_precision("auto", env) == "auto"
    resolved = trainer.step_precision("bf16", env)
    if native_bf16(env.device):
        assert resolved == "bf16" and capsys.readouterr().out == ""
    else:
        assert resolved == "fp32" and "no bf16 units" in capsys.readouterr().out
    for precision, on in (("bf16", True), ("fp32", False), ("auto", False)):
        with autocast(env.device, precision):
            assert torch.is_autocast_enabled("cpu") is on
    assert config.PRESETS["demo"]["train"]["precision"] == "bf16"


def test_the_cli_gives_the_model_the_tokenizer_its_data_was_written_with(small_shards, capsys):
    """A preset names cl100k_base; shards written with a trained BPE decide the model's tokenizer and
    vocab_size before the trainer sees the config."""
    cfg = parse_args(["--preset", "tiny", "--data-dir", str(small_shards)])
    manifest = read_manifest(small_shards)
    assert cfg.model.tokenizer != manifest["tokenizer"]
    take_data_tokenizer(cfg, parallel.DistEnv(0, 0, 1, torch.device("cpu")))
    assert (cfg.model.tokenizer, cfg.model.vocab_size) == (manifest["tokenizer"], manifest["vocab_size"])
    assert "the model takes its tokenizer" in capsys.readouterr().out


def test_the_trainer_refuses_a_config_whose_tokenizer_is_not_its_datas(small_shards, tmp_path):
    cfg = parse_args(["--preset", "tiny", "--data-dir", str(small_shards), "--out", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="is tokenized with"):
        trainer.setup(cfg, parallel.DistEnv(0, 0, 1, torch.device("cpu")))

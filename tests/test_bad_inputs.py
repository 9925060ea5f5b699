"""The bad-input matrix: every entry point (each `gptmini` command's flags, TOML configs, data
sources, checkpoint files, registry names and aliases, flow parameters) answers a bad value with one clear
line naming it, exit code 2, no traceback, and nothing half-written.

The commands run in-process through `gptmini.cli.main(argv)`, the console script's own entry. argparse's
own errors (a flag's type) print its usage summary above the one error line; ours print the line alone.
Each case's message is appended to BASETEMP/bad_inputs.jsonl (docs/reliability.md lists them).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gptmini import checkpoint, config, parallel, weights
from gptmini.cli import COMMANDS
from gptmini.cli import main as gptmini


@dataclass
class World:
    """The files the cases point at: good ones to break one thing at a time, and broken ones."""

    root: Path
    data: Path = field(init=False)
    ckpt: Path = field(init=False)  # a complete training checkpoint (tiny preset)
    weights: Path = field(init=False)  # a save_pretrained folder
    mlflow: str = field(init=False)

    def p(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from gptmini.data.prepare import PrepareConfig, prepare
    from gptmini.model import GPTOSSMini
    from gptmini.weights import save_pretrained

    w = World(tmp_path_factory.mktemp("world"))
    r = w.root
    (r / "corpus.txt").write_text("The quick brown fox jumps over the lazy dog. " * 2000)
    w.data = r / "data"
    prepare(PrepareConfig(sources=[str(r / "corpus.txt")], out=w.data, workers=1, val_fraction=0.0))

    # Sources
    (r / "binary.txt").write_bytes(b"text\0\x01\x02")
    (r / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (r / "nofield.jsonl").write_text('{"body": "no text field"}\n')
    (r / "blank.txt").write_text("  \n\n")
    (r / "empty-folder").mkdir()
    (r / "empty-folder" / "image.png").write_bytes(b"\x89PNG")
    (r / "hf-taken").mkdir()  # an export target someone already uses
    (r / "hf-taken" / "notes.md").write_text("mine")
    # Configs
    (r / "syntax.toml").write_text("[train\nsteps = 3\n")
    (r / "section.toml").write_text("[trian]\nsteps = 3\n")
    (r / "key.toml").write_text("[train]\nstepz = 3\n")
    (r / "type.toml").write_text('[train]\nsteps = "many"\n')
    # Data folders
    shutil.copytree(w.data, r / "corrupt-data")
    shard = next((r / "corrupt-data").glob("train-*.arrow"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    shutil.copytree(w.data, r / "bad-manifest")
    (r / "bad-manifest" / "manifest.json").write_text("{ not json")
    shutil.copytree(w.data, r / "missing-shard")
    next((r / "missing-shard").glob("train-*.arrow")).unlink()

    # A training checkpoint and its variants
    cfg = config.load(cli={"data": {"data_dir": str(w.data)}, "train": {"out_dir": str(r / "run")}}, preset="tiny")
    torch.manual_seed(0)
    model = GPTOSSMini(cfg.model)
    opt = torch.optim.AdamW(model.parameters())
    env = parallel.DistEnv(0, 0, 1, torch.device("cpu"))
    state = {"step": 1, "tokens_seen": 8, "best_val_loss": 1e9, "best_step": -1, "wall_time_s": 0.0,
             "sampler": {"epoch": 0, "consumed": 0, "seed": 0, "n": 10, "shuffle": True}}
    w.ckpt = checkpoint.save_checkpoint(r / "run", 1, model, opt, state, {"rng": checkpoint.rng_state()},
                                        config.to_json(cfg), config.to_toml(cfg), env, keep_last=1)
    shutil.copytree(w.ckpt, r / "incomplete" / "checkpoints" / ".tmp_step_00000002")
    (r / "incomplete" / "checkpoints" / ".tmp_step_00000002" / "COMPLETE").unlink()
    shutil.copytree(w.ckpt, r / "damaged" / "checkpoints" / "step_00000001")
    for data in (r / "damaged" / "checkpoints" / "step_00000001" / "dcp").glob("*.distcp"):
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 10)  # cut, as a copy to a full disk would

    w.weights = r / "weights"
    save_pretrained(model, w.weights)
    shutil.copytree(w.weights, r / "weights-damaged")
    (r / "weights-damaged" / "model.safetensors").write_bytes(b"\0" * 64)
    shutil.copytree(w.weights, r / "weights-other-config")
    other = json.loads((r / "weights-other-config" / "config.json").read_text())
    other["n_layers"] += 1
    (r / "weights-other-config" / "config.json").write_text(json.dumps(other))

    # An MLflow store with one registered version
    from gptmini import registry

    w.mlflow = f"sqlite:///{r / 'mlflow.db'}"
    mc = registry.client(w.mlflow)
    exp = mc.create_experiment("gptmini", artifact_location=(r / "artifacts").as_uri())
    run_id = mc.create_run(exp).info.run_id
    registry.log_model_version(mc, run_id, w.weights, {"val_loss": "1.0"})
    return w


@dataclass
class Case:
    entry: str
    what: str
    argv: Callable[[World], list[str]]
    names: Callable[[World], str]  # what the error line must contain: the value, and so the fix's subject
    leaves_nothing: Callable[[World], list[str]] = lambda w: []  # paths that must not exist afterwards
    argparse: bool = False


def _cases() -> list[Case]:
    data = lambda w: ["--data-dir", str(w.data)]  # noqa: E731
    train = lambda *a: (lambda w: ["train", "--preset", "tiny", *data(w), "--out", w.p("out"), *a])  # noqa: E731
    out_gone = lambda w: [w.p("out")]  # noqa: E731
    prep = lambda *a: (lambda w: ["prepare", "--out", w.p("prep"), "--workers", "1", "--retries", "0",  # noqa: E731
                                  "--timeout", "2", "--cache-dir", w.p("cache"), *[x.format(r=w.root) for x in a]])
    prep_gone = lambda w: [w.p("prep/manifest.json")]  # noqa: E731
    gen = lambda *a: (lambda w: ["generate", *[x.format(r=w.root) for x in a]])  # noqa: E731
    serve = lambda *a: (lambda w: ["serve", *[x.format(r=w.root) for x in a]])  # noqa: E731
    launch = lambda *a, out=True: (lambda w: ["launch", "slurm", *a[:a.index("--") + 1], "--preset", "tiny",  # noqa: E731
                                              *data(w), *(["--out", w.p("out")] if out else []), *a[a.index("--") + 1:]])
    return [
        Case("gptmini", "unknown command", lambda w: ["trian"], lambda w: "'trian'"),
        # prepare: sources and flags
        Case("prepare", "no source", prep(), lambda w: "no sources", prep_gone),
        Case("prepare", "unknown scheme", prep("ftp://example.com/a.txt"), lambda w: "'ftp'", prep_gone),
        Case("prepare", "missing file", prep("{r}/nope.txt"), lambda w: "nope.txt", prep_gone),
        Case("prepare", "glob matching nothing", prep("{r}/*.nothing"), lambda w: "*.nothing", prep_gone),
        Case("prepare", "folder without text files", prep("{r}/empty-folder"), lambda w: "empty-folder", prep_gone),
        Case("prepare", "binary file", prep("{r}/binary.txt"), lambda w: "looks binary", prep_gone),
        Case("prepare", "JSONL line not JSON", prep("{r}/bad.jsonl"), lambda w: "bad.jsonl:2", prep_gone),
        Case("prepare", "JSONL without the text field", prep("{r}/nofield.jsonl"), lambda w: "'text'", prep_gone),
        Case("prepare", "unknown embedded corpus", prep("embedded:nope"), lambda w: "embedded:nope", prep_gone),
        Case("prepare", "empty wikipedia title", prep("wikipedia:"), lambda w: "wikipedia:", prep_gone),
        Case("prepare", "unreachable URL", prep("http://127.0.0.1:9/corpus.txt"), lambda w: "127.0.0.1:9",
             prep_gone),
        Case("prepare", "val fraction out of range", prep("{r}/corpus.txt", "--val-fraction", "1.5"),
             lambda w: "1.5", prep_gone),
        Case("prepare", "shard size 0", prep("{r}/corpus.txt", "--shard-tokens", "0"), lambda w: "--shard-tokens 0",
             prep_gone),
        Case("prepare", "workers 0", prep("{r}/corpus.txt", "--workers", "0"), lambda w: "--workers 0", prep_gone),
        Case("prepare", "unknown tokenizer", prep("{r}/corpus.txt", "--tokenizer", "nope"), lambda w: "'nope'",
             prep_gone),
        Case("prepare", "non-number flag", prep("{r}/corpus.txt", "--val-fraction", "half"), lambda w: "'half'",
             prep_gone, argparse=True),
        Case("prepare", "BPE size below 256 bytes plus end-of-text", prep("{r}/corpus.txt", "--tokenizer", "bpe:100"),
             lambda w: "bpe:100 needs N >= 257", prep_gone),
        Case("prepare", "BPE on an empty corpus", prep("{r}/blank.txt", "--tokenizer", "bpe:300"),
             lambda w: "empty", prep_gone),
        Case("prepare", "split chunks too small", prep("{r}/corpus.txt", "--split-chars", "4"),
             lambda w: "--split-chars 4", prep_gone),
        # train: flags
        Case("train", "unknown preset", train("--preset", "huge"), lambda w: "'huge'", out_gone),
        Case("train", "steps 0", train("--steps", "0"), lambda w: "train.steps = 0", out_gone),
        Case("train", "steps not a number", train("--steps", "many"), lambda w: "'many'", out_gone),
        Case("train", "unknown parallel mode", train("--parallel", "zero3"), lambda w: "'zero3'", out_gone),
        # train: the device mesh (the world is this one process; the launch rows below give it 2 ranks)
        Case("train", "tp not dividing the experts' hidden size", train("--tp", "2", "--model.d_ff", "99"),
             lambda w: "model.d_ff = 99", out_gone),
        Case("train", "ep on a dense model", train("--ep", "2", "--model.num_experts", "0"),
             lambda w: "train.ep = 2", out_gone),
        Case("train", "ep not dividing the experts", train("--ep", "3"), lambda w: "model.num_experts = 4", out_gone),
        Case("train", "tp x ep not dividing the world size", train("--ep", "2"), lambda w: "world size 1", out_gone),
        Case("train", "unknown device", train("--device", "tpu"), lambda w: "'tpu'", out_gone),
        Case("train", "unknown precision", train("--train.precision", "fp8"), lambda w: "'fp8'", out_gone),
        Case("train", "min_lr above lr", train("--optim.min_lr", "1"), lambda w: "optim.min_lr = 1.0", out_gone),
        Case("train", "seq_len above max_seq_len", train("--seq-len", "100000"), lambda w: "100000", out_gone),
        Case("train", "heads not dividing d_model", train("--model.n_heads", "3"), lambda w: "n_heads=3", out_gone),
        Case("train", "unknown tokenizer", train("--model.tokenizer", "nope"), lambda w: "'nope'", out_gone),
        Case("train", "vocab below the tokenizer's", train("--model.vocab_size", "1000"), lambda w: "vocab_size=1000",
             out_gone),
        Case("train", "batch larger than the data", train("--batch-size", "100000"), lambda w: "batch_size=100000",
             out_gone),
        Case("train", "unknown flag", train("--stepz", "3"), lambda w: "--stepz", out_gone, argparse=True),
        Case("train", "no data", lambda w: ["train", "--preset", "tiny", "--out", w.p("out")],
             lambda w: "no training data", out_gone),
        # train: TOML configs
        Case("train", "config file missing", train("--config", "nope.toml"), lambda w: "nope.toml", out_gone),
        Case("train", "config not TOML", lambda w: train("--config", w.p("syntax.toml"))(w), lambda w: "syntax.toml",
             out_gone),
        Case("train", "config unknown section", lambda w: train("--config", w.p("section.toml"))(w),
             lambda w: "[trian]", out_gone),
        Case("train", "config unknown key", lambda w: train("--config", w.p("key.toml"))(w), lambda w: "train.stepz",
             out_gone),
        Case("train", "config wrong type", lambda w: train("--config", w.p("type.toml"))(w), lambda w: "'many'",
             out_gone),
        # train: data folders and checkpoints
        Case("train", "data folder without manifest", lambda w: ["train", "--preset", "tiny", "--data-dir",
             w.p("nothing"), "--out", w.p("out")], lambda w: "no manifest.json", out_gone),
        Case("train", "manifest not JSON", lambda w: ["train", "--preset", "tiny", "--data-dir", w.p("bad-manifest"),
             "--out", w.p("out")], lambda w: "not valid JSON", out_gone),
        Case("train", "corrupted shard", lambda w: ["train", "--preset", "tiny", "--data-dir", w.p("corrupt-data"),
             "--out", w.p("out")], lambda w: "is corrupted", out_gone),
        Case("train", "missing shard", lambda w: ["train", "--preset", "tiny", "--data-dir", w.p("missing-shard"),
             "--out", w.p("out")], lambda w: "is missing", out_gone),
        Case("train", "resume from a folder that is no checkpoint", train("--resume", "/nonexistent/ckpt"),
             lambda w: "/nonexistent/ckpt", out_gone),
        Case("train", "resume from a half-written checkpoint",
             lambda w: train("--resume", w.p("incomplete/checkpoints/.tmp_step_00000002"))(w),
             lambda w: ".tmp_step_00000002", out_gone),
        Case("train", "resume from a damaged checkpoint",
             lambda w: ["train", "--preset", "tiny", *data(w), "--out", w.p("damaged"), "--resume", "auto"],
             lambda w: "is damaged"),
        Case("train", "fresh run into a folder with checkpoints",
             lambda w: ["train", "--preset", "tiny", *data(w), "--out", w.p("run")], lambda w: "--resume auto"),
        # eval
        Case("eval", "checkpoint path missing", lambda w: ["eval", "--checkpoint", w.p("nope")], lambda w: "nope"),
        Case("eval", "folder that is no checkpoint", lambda w: ["eval", "--checkpoint", w.p("empty-folder")],
             lambda w: "empty-folder"),
        Case("eval", "half-written checkpoint",
             lambda w: ["eval", "--checkpoint", w.p("incomplete/checkpoints/.tmp_step_00000002"), *data(w),
                        "--json", w.p("eval.json")], lambda w: ".tmp_step_00000002", lambda w: [w.p("eval.json")]),
        Case("eval", "damaged checkpoint",
             lambda w: ["eval", "--checkpoint", w.p("damaged/checkpoints/step_00000001"), *data(w), "--split", "train",
                        "--json", w.p("eval.json")], lambda w: "is damaged", lambda w: [w.p("eval.json")]),
        Case("eval", "data folder without manifest",
             lambda w: ["eval", "--checkpoint", str(w.weights), "--data-dir", w.p("nothing"),
                        "--json", w.p("eval.json")], lambda w: "no manifest.json", lambda w: [w.p("eval.json")]),
        Case("eval", "batch size 0", lambda w: ["eval", "--checkpoint", str(w.weights), "--batch-size", "0"],
             lambda w: "--batch-size 0", argparse=True),
        Case("eval", "unknown split", lambda w: ["eval", "--checkpoint", str(w.weights), "--split", "test"],
             lambda w: "'test'", argparse=True),
        # generate
        Case("index", "data folder without manifest", lambda w: ["index", w.p("nothing")], lambda w: "no manifest.json"),
        Case("index", "passages too short", lambda w: ["index", str(w.data), "--passage-chars", "8"],
             lambda w: "--passage-chars 8"),
        Case("generate", "rag k out of range", gen("--checkpoint", "{r}/weights", "--rag", "--index", "{r}/data",
                                                   "--rag-k", "0"), lambda w: "k=0 is out of range; use 1 to 50"),
        Case("serve", "retrieval K out of range", serve("--checkpoint", "{r}/weights", "--retrieval", "51"),
             lambda w: "--retrieval=51", argparse=True),
        Case("serve", "an index for a registry version", serve("--model", "models:/gptmini@production", "--index",
                                                               "{r}/data"), lambda w: "--index", argparse=True),
        Case("serve", "checkpoint path missing", serve("--checkpoint", "{r}/nope"), lambda w: "nope"),
        Case("serve", "damaged weights", serve("--checkpoint", "{r}/weights-damaged"), lambda w: "weights-damaged"),
        Case("serve", "registry URI with a path", serve("--model", "models:/../../etc@production"),
             lambda w: "models:/../../etc@production"),
        Case("serve", "not a registry URI", serve("--model", "runs:/abc/model"), lambda w: "runs:/abc/model"),
        Case("serve", "max-batch 0", serve("--checkpoint", "{r}/weights", "--max-batch", "0"),
             lambda w: "--max-batch=0", argparse=True),
        Case("serve", "poll interval 0", serve("--model", "models:/gptmini@production", "--poll-interval", "0"),
             lambda w: "--poll-interval=0", argparse=True),
        Case("serve", "port out of range", serve("--checkpoint", "{r}/weights", "--port", "70000"),
             lambda w: "--port=70000", argparse=True),
        Case("serve", "an API key too short to be secret", serve("--checkpoint", "{r}/weights", "--api-key", "abc"),
             lambda w: "shorter than 8"),
        Case("launch", "train arguments not after --", lambda w: ["launch", "slurm", "--nodes", "2"], lambda w: "`--`",
             argparse=True),
        Case("launch", "2 nodes with --parallel none", launch("--nodes", "2", "--"), lambda w: "--parallel none",
             out_gone),
        Case("launch", "tp not dividing the kv heads", launch("--nodes", "2", "--", "--tp", "2", "--model.num_experts",
             "0", "--model.n_heads", "8", "--model.n_kv_heads", "1"), lambda w: "model.n_kv_heads = 1", out_gone),
        Case("launch", "dp-shard not dividing the data ranks", launch("--nodes", "2", "--", "--dp-shard", "3"),
             lambda w: "train.dp_shard = 3", out_gone),
        Case("launch", "an sbatch line that is not an option", launch("--sbatch", "qos=high", "--"),
             lambda w: "'qos=high'", out_gone),
        Case("launch", "no run folder", launch("--", out=False), lambda w: "--out DIR"),
        Case("launch", "an unknown preset", launch("--", "--preset", "huge"), lambda w: "'huge'", out_gone),
        Case("generate", "checkpoint path missing", gen("--checkpoint", "{r}/nope"), lambda w: "nope"),
        Case("generate", "damaged weights", gen("--checkpoint", "{r}/weights-damaged"), lambda w: "weights-damaged"),
        Case("generate", "weights of another config", gen("--checkpoint", "{r}/weights-other-config"),
             lambda w: "weights-other-config"),
        Case("generate", "negative temperature", gen("--checkpoint", "{r}/weights", "--temperature", "-1"),
             lambda w: "temperature=-1.0"),
        Case("generate", "top-p above 1", gen("--checkpoint", "{r}/weights", "--top-p", "2"), lambda w: "top_p=2.0"),
        Case("generate", "top-k 0", gen("--checkpoint", "{r}/weights", "--top-k", "0"), lambda w: "top_k=0"),
        Case("generate", "max-new-tokens 0", gen("--checkpoint", "{r}/weights", "--max-new-tokens", "0"),
             lambda w: "--max-new-tokens=0", argparse=True),
        Case("generate", "registry URI with a path", gen("--model", "models:/../../etc@production"),
             lambda w: "models:/../../etc@production"),
        Case("generate", "not a registry URI", gen("--model", "runs:/abc/model"), lambda w: "runs:/abc/model"),
        Case("generate", "unknown quantize mode", gen("--checkpoint", "{r}/weights", "--quantize", "int4"),
             lambda w: "'int4'", argparse=True),
        # export-hf
        Case("export-hf", "damaged weights",
             lambda w: ["export-hf", "--checkpoint", w.p("weights-damaged"), "--out", w.p("hf")],
             lambda w: "weights-damaged", lambda w: [w.p("hf")]),
        Case("export-hf", "checkpoint path missing",
             lambda w: ["export-hf", "--checkpoint", w.p("nope"), "--out", w.p("hf")], lambda w: "nope",
             lambda w: [w.p("hf")]),
        Case("export-hf", "output folder not empty",
             lambda w: ["export-hf", "--checkpoint", w.p("weights"), "--out", w.p("hf-taken")], lambda w: "hf-taken",
             lambda w: [w.p("hf-taken/config.json"), w.p("hf-taken/model.safetensors")]),
        # promote: registry names and aliases
        Case("promote", "no tracking server", lambda w: ["promote", "1"], lambda w: "MLFLOW_TRACKING_URI"),
        Case("promote", "version not a number", lambda w: ["promote", "latest", "--tracking-uri", w.mlflow],
             lambda w: "'latest'", argparse=True),
        Case("promote", "version that does not exist", lambda w: ["promote", "99", "--tracking-uri", w.mlflow],
             lambda w: "'99'"),
        Case("promote", "alias with a space", lambda w: ["promote", "1", "--alias", "prod uction", "--tracking-uri",
             w.mlflow], lambda w: "'prod uction'"),
        Case("promote", "alias with a path", lambda w: ["promote", "1", "--alias", "../x", "--tracking-uri", w.mlflow],
             lambda w: "'../x'"),
        Case("promote", "unknown model name", lambda w: ["promote", "1", "--name", "nope", "--tracking-uri",
             w.mlflow], lambda w: "'nope'"),
    ]


CASES = _cases()


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "bad_inputs.jsonl"
    path.unlink(missing_ok=True)
    with open(path, "a") as f:
        yield lambda **row: (f.write(json.dumps(row) + "\n"), f.flush())


@pytest.mark.parametrize("case", CASES, ids=[f"{c.entry}: {c.what}" for c in CASES])
def test_bad_input_gets_one_clear_line_and_a_nonzero_exit(case, world, record, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GPTMINI_CACHE_DIR", str(world.root / "registry-cache"))
    argv = case.argv(world)
    try:
        code = gptmini(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.strip() and not _mlflow_chatter(ln)]
    record(entry=case.entry, case=case.what, argv=" ".join(argv).replace(str(world.root), "…"), exit=code,
           message=(lines[-1] if lines else "").replace(str(world.root), "…"))
    assert code == 2, f"exit {code} for {argv}: bad input exits 2"
    assert "Traceback" not in err, err
    assert lines, "no message on stderr"
    message = lines[-1]
    if case.argparse:
        assert ": error: " in message, err
    else:
        assert len(lines) == 1, f"more than one line:\n{err}"
    assert case.names(world) in message, f"the message does not name {case.names(world)!r}: {message}"
    for path in case.leaves_nothing(world):
        assert not Path(path).exists(), f"{path} was left behind"


def _mlflow_chatter(line: str) -> bool:
    """MLflow's INFO lines about creating/migrating a SQLite store's tables on first use."""
    return " INFO mlflow." in line or line.startswith(("INFO  [alembic", "INFO [alembic"))


def test_every_command_has_cases():
    covered = {c.entry for c in CASES}
    assert covered >= {"gptmini", *COMMANDS}  # the real command table: a new command needs its cases


def test_the_checkpoints_the_matrix_broke_are_still_refused_only_where_broken(world):
    """The cases above must not have touched the good files they were made from."""
    from gptmini.weights import load_pretrained

    from_ckpt, _ = weights.load_model(world.ckpt)
    from_weights, _ = load_pretrained(world.weights)
    a, b = from_ckpt.state_dict(), from_weights.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same model, whole


# Flow parameters: validated at the flow's boundary, before any MLflow run or state is created


@pytest.fixture
def flows_state(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTMINI_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'state' / 'never.db'}")
    return tmp_path / "state"


FLOW_CASES = [
    ({"preset": "huge"}, "'huge'"),
    ({"steps": 0}, "train.steps = 0"),
    ({"nproc": 0}, "nproc (0)"),
    ({"sources": []}, "sources is empty"),
    ({"sources": ["/no/such/corpus.txt"]}, "/no/such/corpus.txt"),
    ({"sources": ["ftp://example.com/a.txt"]}, "ftp://example.com/a.txt"),
    ({"model_name": "my model"}, "'my model'"),
    ({"tokenizer": "gpt5"}, "'gpt5'"),
    ({"val_fraction": 1.5}, "val-fraction 1.5 is outside [0, 1)"),
    ({"val_fraction": 0.0}, "val_fraction (0)"),
    ({"extra_args": ["--lr", "fast"]}, "'fast'"),
    ({"nnodes": 2}, "rdzv_endpoint"),
    ({"parallel": "zero3"}, "'zero3'"),
    ({"parallel": "fsdp+ep:2"}, "world size 1"),  # 2 expert shards on the flow's 1 process
]


@pytest.mark.parametrize("params,names", FLOW_CASES, ids=[json.dumps(p) for p, _ in FLOW_CASES])
def test_bad_train_gpt_parameters_fail_before_anything_is_created(params, names, flows_state, record):
    from flows.train_gpt import train_gpt

    with pytest.raises(ValueError) as info:
        train_gpt.fn(**params)
    message = str(info.value)
    record(entry="train-gpt flow", case=json.dumps(params), argv="", exit="Failed", message=message)
    assert names in message and "\n" not in message
    assert not flows_state.exists()


@pytest.mark.parametrize("params,names", [({"device": "tpu"}, "device"),
                                          ({"launcher": "pbs"}, "launcher"),
                                          ({"promotion": "sometimes"}, "promotion"), ({"steps": "many"}, "steps")])
def test_flow_parameters_of_the_wrong_type_are_refused_by_prefect(params, names, flows_state, record):
    from prefect.exceptions import ParameterTypeError

    from flows.train_gpt import train_gpt

    with pytest.raises(ParameterTypeError) as info:
        train_gpt.validate_parameters(params)
    record(entry="train-gpt flow", case=json.dumps(params), argv="", exit="Failed (parameter validation)",
           message=str(info.value).splitlines()[0])
    assert names in str(info.value)


@pytest.mark.parametrize("params,names", [({"version": 0}, "version 0"), ({"version": 1, "alias": "../x"}, "'../x'")])
def test_bad_promote_model_parameters_fail_before_the_registry_is_touched(params, names, flows_state, record):
    from flows.promote import promote_model

    with pytest.raises(ValueError) as info:
        promote_model.fn(**params)
    record(entry="promote-model flow", case=json.dumps(params), argv="", exit="Failed", message=str(info.value))
    assert names in str(info.value)
    assert not flows_state.exists()

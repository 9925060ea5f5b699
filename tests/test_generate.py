import shutil
import sys

import pytest
import torch
from model_helpers import sharp_model, tiny

from gptmini.config import model_preset
from gptmini.model import GPTOSSMini
from gptmini.cli.generate import main as generate_main
from gptmini.generate import generate, stream
from gptmini.generate import sample_next
from gptmini.cli.export_hf import main as export_main
from gptmini.model import KVCache
from gptmini.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_kv_heads=4, num_experts=0),  # MHA, dense
        dict(n_kv_heads=2),  # GQA, MoE
        dict(n_kv_heads=1, sliding_window=5),  # MQA, ring buffer wraps many times
        dict(n_kv_heads=2, sliding_window=16),  # window longer than the prompt, shorter than the total
    ],
    ids=["mha-dense", "gqa-moe", "mqa-window5", "gqa-window16"],
)
def test_kv_cache_generation_matches_full_recompute(overrides):
    model = sharp_model(tiny(**overrides))
    x = torch.randint(0, 256, (3, 9))
    cached = generate(model, x, 40, temperature=0, use_cache=True)
    full = generate(model, x, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 49)
    assert torch.equal(cached, full)
    assert cached[:, 9:].unique().numel() > 20  # the sharp model does not just repeat one token


def test_prompt_longer_than_the_window_fills_the_ring_from_its_tail():
    model = sharp_model(tiny(sliding_window=4))
    x = torch.randint(0, 256, (2, 11))
    assert torch.equal(generate(model, x, 12, temperature=0), generate(model, x, 12, temperature=0, use_cache=False))


def test_kv_cache_holds_only_the_kv_heads_and_a_window_of_slots():
    cfg = tiny(n_heads=4, n_kv_heads=1, sliding_window=8)
    cache = KVCache(cfg, 2, torch.device("cpu"), torch.float32, max_len=40)
    assert cache.k.shape == (cfg.n_layers, 2, 1, 8, cfg.head_dim)


def test_padded_batch_matches_prompts_run_one_by_one():
    model = sharp_model(tiny(sliding_window=6))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    batch = generate(model, prompts, 15, temperature=0)
    alone = [generate(model, [p], 15, temperature=0)[0] for p in prompts]
    assert batch == alone
    assert batch == generate(model, prompts, 15, temperature=0, use_cache=False)


def test_temperature_zero_is_greedy_argmax():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (2, 5))
    out = generate(model, x, 6, temperature=0)
    seq = x
    for _ in range(6):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_under_a_seed():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (2, 5))

    def run(seed):
        return generate(model, x, 20, temperature=1.0, top_k=50, top_p=0.95, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax mass: 0.64, 0.23, 0.09, ... -> the nucleus for 0.8 is {0, 1}, for 0.5 just {0}
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    allowed = torch.tensor([False, True, True, True, True, True])
    assert set(sample_next(logits, 1.0, top_k=1, allowed=allowed, generator=g).tolist()) == {1}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == set(range(6))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        generate(GPTOSSMini(tiny()), torch.zeros(1, 2, dtype=torch.long), 2, **kwargs)


def test_each_row_stops_at_end_of_text():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (3, 4))
    free = generate(model, x, 12, temperature=0)
    eos = int(free[0, 4 + 2])  # row 0's third new token
    out = generate(model, x, 12, temperature=0, eos_token_id=eos)
    stop = (free[0, 4:] == eos).nonzero()[0].item()  # first time row 0 emits it (at most step 2)
    assert (out[0, 4 + stop:] == eos).all()
    for row in (1, 2):  # a row continues untouched until it emits eos itself
        hits = (free[row, 4:] == eos).nonzero()
        end = hits[0].item() if len(hits) else out.size(1) - 4
        assert torch.equal(out[row, 4:4 + end], free[row, 4:4 + end])
    as_lists = generate(model, x.tolist(), 12, temperature=0, eos_token_id=eos)
    assert as_lists[0] == x[0].tolist() + free[0, 4:4 + stop + 1].tolist()  # ends with eos


def test_generation_stops_early_once_every_row_is_done():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (1, 4))
    eos = int(generate(model, x, 1, temperature=0)[0, -1])
    assert generate(model, x, 50, temperature=0, eos_token_id=eos).shape == (1, 5)


def test_generating_past_max_seq_len_without_window_or_scaling_is_a_clear_error():
    model = GPTOSSMini(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 10)


def test_stream_yields_one_column_per_step():
    model = sharp_model(tiny())
    x = torch.randint(0, 256, (2, 3))
    cols = list(stream(model, x, 5, temperature=0))
    assert len(cols) == 5 and all(c.shape == (2,) for c in cols)
    assert torch.equal(torch.stack(cols, 1), generate(model, x, 5, temperature=0)[:, 3:])


def test_generation_runs_in_eval_mode_and_restores_training_mode():
    model = sharp_model(tiny(dropout=0.5)).train()
    x = torch.randint(0, 256, (2, 3))
    a = generate(model, x, 5, temperature=0)
    assert model.training
    assert torch.equal(a, generate(model, x, 5, temperature=0))  # no dropout while generating


class RecordingStdout:
    def __init__(self):
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "final"
    save_pretrained(sharp_model(model_preset("tiny"), std=0.05), path)
    return path


def test_cli_streams_tokens_as_they_come(checkpoint, monkeypatch):
    out = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    rc = generate_main(["--checkpoint", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "1"])
    assert rc == 0
    assert out.writes[0] == "Hello"
    assert out.flushes >= 2  # flushed token by token, not once at the end
    text = "".join(out.writes)
    again = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", again)
    generate_main(["--checkpoint", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "8", "--seed", "1"])
    assert "".join(again.writes) == text  # seeded


def test_cli_prints_a_batch_of_prompts(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "a", "--prompt", "the long one", "--max-new-tokens", "4"]
    assert generate_main(args + ["--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- [0]\na" in out and "--- [1]\nthe long one" in out


def test_cli_bad_input_is_one_clear_error(checkpoint, tmp_path, capsys):
    assert generate_main(["--checkpoint", str(checkpoint), "--temperature", "-1"]) == 2
    assert "temperature=-1.0" in capsys.readouterr().err
    assert generate_main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "'" + str(tmp_path / "missing") + "' does not exist" in capsys.readouterr().err


def test_cli_takes_a_run_folder_as_gptmini_eval_does(checkpoint, tmp_path, capsys):
    """`--checkpoint RUN` resolves to the run's final/, else checkpoints/best/ (weights.load_model)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, run / "checkpoints" / "best")
    args = ["--prompt", "a", "--max-new-tokens", "6", "--temperature", "0"]
    assert generate_main(["--checkpoint", str(checkpoint), *args]) == 0
    expected = capsys.readouterr().out
    assert generate_main(["--checkpoint", str(run), *args]) == 0
    assert capsys.readouterr().out == expected
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()

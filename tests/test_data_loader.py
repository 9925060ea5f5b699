"""Loading: verified shards, sliding windows, per-rank samplers that resume exactly, and the bad cases."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gptmini.data.loader import (
    DistributedWindowSampler,
    SlidingWindowDataset,
    TokenShards,
    WindowLoader,
    build_loaders,
)
from gptmini.data.prepare import FORMAT, PrepareConfig, prepare
from gptmini.data.sources import DataError, sha256_file


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The embedded corpus in shards of 20k tokens, so windows cross shard boundaries."""
    tmp = tmp_path_factory.mktemp("loader")
    prepare(PrepareConfig(["embedded:python-docs"], tmp / "out", val_fraction=0.1, shard_tokens=20_000, workers=1,
                          cache_dir=tmp / "cache"))
    return tmp / "out"


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def manifest_of(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def test_token_shards_are_one_stream_across_shards(data_dir):
    shards = TokenShards.open(data_dir, "train")
    manifest = manifest_of(data_dir)
    parts = [pa.ipc.open_file(str(data_dir / s["file"])).read_all().column(0).to_numpy()
             for s in manifest["splits"]["train"]["shards"]]
    flat = np.concatenate(parts)
    assert len(parts) > 3 and len(shards) == len(flat) == manifest["splits"]["train"]["tokens"]
    for a, b in [(0, 10), (19_990, 20_010), (39_000, 61_000), (len(flat) - 5, len(flat))]:
        assert np.array_equal(shards[a:b], flat[a:b])
    assert np.shares_memory(shards[5:10], shards.segments[0])  # inside a shard: a view of the memory map


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 8), (8, 3), (8, 11), (1, 1)])
def test_windows_cover_the_stream_exactly_as_the_stride_says(seq_len, stride):
    tokens = np.arange(100, dtype=np.uint32)
    ds = SlidingWindowDataset(tokens, seq_len, stride)
    assert len(ds) == (100 - seq_len - 1) // stride + 1
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.tolist() == list(range(i * stride, i * stride + seq_len))
        assert y.tolist() == list(range(i * stride + 1, i * stride + seq_len + 1))
    last_end = (len(ds) - 1) * stride + seq_len + 1
    assert last_end <= 100 < last_end + stride  # the unused tail is shorter than one stride


def test_batches_match_the_windows(data_dir):
    ds = SlidingWindowDataset(TokenShards.open(data_dir, "train"), 64, 50)
    idx = np.array([0, 399, 400, len(ds) - 1])  # 400*50 = 20000: a window across the first shard boundary
    x, y = ds.batch(idx)
    assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
    for row, i in enumerate(idx):
        wx, wy = ds[int(i)]
        assert torch.equal(x[row], wx) and torch.equal(y[row], wy)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_per_rank_samplers_are_disjoint_and_complete_every_epoch(world_size):
    n = 103
    for epoch in range(3):
        parts = []
        for rank in range(world_size):
            s = DistributedWindowSampler(n, rank, world_size, seed=7)
            s.set_epoch(epoch)
            parts.append(list(s))
        assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
        seen = [i for p in parts for i in p]
        assert len(seen) == len(set(seen)) == n - n % world_size  # disjoint; only the remainder is dropped
    one, two = (list(DistributedWindowSampler(n, 0, 1, seed=7)) for _ in range(2))
    assert one == two  # deterministic
    later = DistributedWindowSampler(n, 0, 1, seed=7)
    later.set_epoch(1)
    assert list(later) != one and sorted(later.order()) == list(range(n))  # reshuffled by epoch
    assert list(DistributedWindowSampler(n, 0, 1, seed=8)) != one  # and by seed


def test_a_saved_sampler_state_gives_the_same_next_batches(data_dir):
    train, _ = build_loaders(data_dir, seq_len=32, stride=16, batch_size=4, seed=3)
    per_epoch = len(train)
    for _ in range(per_epoch - 2):  # stop just before an epoch boundary
        train.next_batch()
    state = json.loads(json.dumps(train.state_dict()))  # survives a checkpoint as plain data
    expected = [train.next_batch() for _ in range(5)]  # crosses into epoch 1
    assert train.epoch == 1
    resumed, _ = build_loaders(data_dir, seq_len=32, stride=16, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # what a training loop does at the top of an epoch: keeps the position
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(5)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_a_state_resumes_on_a_different_world_size_without_repeating_windows():
    n = 40
    two = [DistributedWindowSampler(n, r, 2, seed=1) for r in range(2)]
    taken = set()
    for s in two:
        idx = s.remaining()[:6]
        taken |= set(idx.tolist())
        s.advance(6)
    assert two[0].state_dict() == two[1].state_dict()
    four = [DistributedWindowSampler(n, r, 4, seed=1) for r in range(4)]
    rest = []
    for s in four:
        s.load_state_dict(two[0].state_dict())
        rest += list(s)
    assert taken.isdisjoint(rest) and len(taken) + len(rest) == n


def test_iterating_the_loader_gives_the_rest_of_the_epoch(data_dir):
    train, _ = build_loaders(data_dir, seq_len=64, batch_size=8, rank=1, world_size=2, seed=0)
    first = [x for x, _ in train]
    assert len(first) == len(train) and all(x.shape == (8, 64) for x in first)
    assert list(train) == [] and train.epoch == 0  # exhausted until the next epoch
    train.set_epoch(1)
    assert len(list(train)) == len(train)


def test_val_windows_cover_every_val_token_once_and_never_read_across_an_end_of_text(data_dir):
    _, val = build_loaders(data_dir, seq_len=64, batch_size=5, rank=0, world_size=1)
    tokens = np.asarray(TokenShards.open(data_dir, "val")[:])
    eot = TokenShards.open(data_dir, "val").manifest["eot_token"]
    passes = [[(x, y) for x, y in val] for _ in range(2)]
    xs, ys = (torch.cat([b[i] for b in passes[0]]) for i in (0, 1))
    assert torch.equal(xs, torch.cat([x for x, _ in passes[1]]))  # ordered: the same full pass each time
    # Every token but end-of-text is a target exactly once, in stream order.
    assert torch.equal(ys[ys != -1], torch.from_numpy(tokens[tokens != eot].astype(np.int64)))
    for x, y in zip(xs, ys):
        n = int((y != -1).sum())
        assert eot not in y[:n] and torch.equal(x[1:n], y[: n - 1])  # one piece, read left to right
    starts = [i for i, x in enumerate(xs) if x[0] == eot]  # each piece starts after an end-of-text
    assert len(starts) == len(np.flatnonzero(tokens == eot))


def test_val_is_split_between_ranks_evenly_and_whole(data_dir):
    parts = [build_loaders(data_dir, seq_len=64, batch_size=4, rank=r, world_size=3)[1] for r in range(3)]
    rows = [torch.cat([y for _, y in v]) for v in parts]
    assert len({len(v) for v in parts}) == 1 and len({r.shape[0] for r in rows}) == 1
    whole = torch.cat([torch.cat([y for _, y in build_loaders(data_dir, seq_len=64, batch_size=4)[1]])])
    assert sum(int((r != -1).sum()) for r in rows) == int((whole != -1).sum())  # no window dropped


def test_a_training_loop_consumes_the_batches(data_dir):
    train, val = build_loaders(data_dir, seq_len=16, batch_size=8, seed=0, vocab_size=100352)
    torch.manual_seed(0)
    # a bigram model over ids hashed into 4096 rows, small enough for 2 cores: predicts the next id modulo 256
    model = torch.nn.Sequential(torch.nn.Embedding(4096, 16), torch.nn.Linear(16, 256))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)

    def loss_of(x, y):
        return torch.nn.functional.cross_entropy(model(x % 4096).view(-1, 256), (y % 256).view(-1))

    losses = []
    for _ in range(40):
        loss = loss_of(*train.next_batch())
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_loss = np.mean([loss_of(x, y).item() for x, y in itertools.islice(val, 3)])
    assert np.mean(losses[-3:]) < losses[0] and val_loss < losses[0]


def test_truncated_shard_is_named(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    name = manifest_of(d)["splits"]["train"]["shards"][1]["file"]
    (d / name).write_bytes((d / name).read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"shard {name} is truncated or altered: \d+ bytes on disk, the manifest says \d+; re-run"):
        TokenShards.open(d, "train")


def test_corrupted_shard_fails_its_sha256_naming_it(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    name = manifest_of(d)["splits"]["val"]["shards"][0]["file"]
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / name).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {name} is corrupted: sha256 [0-9a-f]+\.\.\., the manifest says"):
        build_loaders(d, seq_len=16, batch_size=2)


def test_missing_shard_and_missing_manifest_are_named(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    name = manifest_of(d)["splits"]["train"]["shards"][0]["file"]
    (d / name).unlink()
    with pytest.raises(DataError, match=rf"shard {name} is missing from"):
        TokenShards.open(d, "train")
    with pytest.raises(DataError, match=r"no manifest.json in .*; run `gptmini prepare SOURCE\.\.\. --out"):
        TokenShards.open(tmp_path, "train")


def test_a_file_that_is_not_arrow_is_named(data_dir, tmp_path):
    d = copy_dir(data_dir, tmp_path / "d")
    manifest = manifest_of(d)
    shard = manifest["splits"]["train"]["shards"][0]
    (d / shard["file"]).write_bytes(b"x" * shard["bytes"])  # right size, fixed-up hash: only the format is wrong
    shard["sha256"] = sha256_file(d / shard["file"])
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"shard {shard['file']} is not a readable Arrow IPC file"):
        TokenShards.open(d, "train")


def test_a_token_id_at_or_above_the_vocabulary_is_caught(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    tokens = np.array([1, 2, 100277, 5], dtype=np.uint32)  # 100277 == cl100k's n_vocab: one past the last id
    batch = pa.record_batch([pa.array(tokens)], names=["tokens"])
    with pa.OSFile(str(d / "train-00000.arrow"), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as w:
        w.write_batch(batch)
    shard = {"file": "train-00000.arrow", "tokens": 4, "bytes": (d / "train-00000.arrow").stat().st_size,
             "sha256": sha256_file(d / "train-00000.arrow")}
    manifest = {"format": FORMAT, "tokenizer": "cl100k_base", "n_vocab": 100277, "vocab_size": 100352,
                "splits": {"train": {"tokens": 4, "shards": [shard]}, "val": {"tokens": 0, "shards": []}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-00000\.arrow holds token id 100277 \(first bad id at position 2\), at or above the tokenizer's n_vocab=100277"):
        TokenShards.open(d, "train")


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_caught(data_dir):
    with pytest.raises(DataError, match=r"model vocab_size=50304 is below the shards' n_vocab=100277 \(cl100k_base\); set vocab_size=100352"):
        build_loaders(data_dir, seq_len=16, vocab_size=50304)


def test_a_corpus_shorter_than_one_window_says_the_minimum(tmp_path):
    (tmp_path / "short.txt").write_text("only a few tokens here")
    prepare(PrepareConfig([str(tmp_path / "short.txt")], tmp_path / "out", val_fraction=0.0, workers=1,
                          cache_dir=tmp_path / "c"))
    with pytest.raises(DataError, match=r"the train stream has 6 tokens, fewer than one window needs: the minimum is seq_len \+ 1 = 65; .*lower seq_len to at most 5"):
        build_loaders(tmp_path / "out", seq_len=64)
    with pytest.raises(DataError, match=r"fewer than batch_size=8; the minimum is 9 tokens for world_size=1"):
        build_loaders(tmp_path / "out", seq_len=1, stride=1, batch_size=8)
    with pytest.warns(UserWarning, match=r"the val split of .* is empty; raise --val-fraction"):
        _, val = build_loaders(tmp_path / "out", seq_len=2, stride=1, batch_size=2)
    assert val is None


def test_sampler_state_from_other_data_is_refused():
    s = DistributedWindowSampler(100, seed=1)
    with pytest.raises(DataError, match=r"sampler state is for n=50 windows.*resume with the same data"):
        s.load_state_dict(DistributedWindowSampler(50, seed=1).state_dict())


@pytest.mark.gpu
def test_loader_on_cuda_pins_and_copies_non_blocking(data_dir):
    train, _ = build_loaders(data_dir, seq_len=16, batch_size=4, device="cuda")
    x, y = train.next_batch()
    assert x.is_cuda and y.is_cuda and x.dtype == torch.int64


def test_window_loader_wraps_a_plain_array():
    ds = SlidingWindowDataset(np.arange(50, dtype=np.uint32), 4, 4)
    loader = WindowLoader(ds, DistributedWindowSampler(len(ds), shuffle=False), batch_size=3)
    assert [x[:, 0].tolist() for x, _ in loader] == [[0, 4, 8], [12, 16, 20], [24, 28, 32], [36, 40, 44]]

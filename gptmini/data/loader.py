"""Training batches from token shards: verify and memory-map, cut sliding windows, split them over ranks.

`TokenShards.open(dir, split)` checks every shard against the manifest (size, sha256, Arrow layout, token
count, ids below the vocabulary) and maps it read-only: the OS pages tokens in as windows touch them.
`SlidingWindowDataset` cuts the stream into windows of `seq_len + 1` tokens every `stride` tokens;
`DistributedWindowSampler` gives each rank a disjoint part of a (seed, epoch) permutation of the windows
and remembers how far it got, so a resumed run takes the very next batch. `WindowLoader` builds the
(B, T) int64 batches in the training process, without DataLoader workers: gathering B windows from a
memory map costs microseconds, and no prefetching worker means the sampler's position is exact.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from gptmini.data.prepare import SPLITS, new_ranges, read_manifest
from gptmini.data.sources import DataError
from gptmini.files import sha256_file

RERUN = "re-run `gptmini prepare ... --out {dir} --force` to rebuild the shards"


class TokenShards:
    """One split's token stream: a verified, read-only memory map of each shard, end to end."""

    def __init__(self, segments: list[np.ndarray], manifest: dict | None = None, split: str = "train"):
        self.segments = segments
        self.manifest = manifest or {}
        self.split = split
        self.offsets = np.cumsum([0] + [len(s) for s in segments])  # offsets[i]: stream position of segment i

    @classmethod
    def open(cls, data_dir: str | Path, split: str = "train", verify: bool = True) -> TokenShards:
        data_dir = Path(data_dir)
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"split {split!r} is not in {data_dir}/manifest.json; choose one of {list(manifest['splits'])}")
        segments = [
            seg
            for shard in manifest["splits"][split]["shards"]
            for seg in _open_shard(data_dir, shard, manifest["n_vocab"], verify)
        ]
        return cls(segments, manifest, split)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, s: slice) -> np.ndarray:
        """Tokens [start, stop): a view when they lie in one shard, else a copy across the boundary."""
        start, stop, _ = s.indices(len(self))
        if start >= stop:
            return np.empty(0, dtype=np.uint32)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        lo = start - self.offsets[i]
        if stop <= self.offsets[i + 1]:
            return self.segments[i][lo : lo + stop - start]
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            end = min(stop, int(self.offsets[i + 1]))
            parts.append(self.segments[i][pos - self.offsets[i] : end - self.offsets[i]])
            pos = end
        return np.concatenate(parts)


def _uint32_view(column) -> np.ndarray:
    """A zero-copy numpy view of a null-free uint32 column (a pyarrow Array: its data buffer, at the column's
    offset). `Array.to_numpy` does the same but imports pandas first, a second of every trainer's start."""
    import pyarrow as pa

    if column.null_count:
        raise pa.ArrowInvalid(f"{column.null_count} null token(s)")
    return np.frombuffer(column.buffers()[1], dtype=np.uint32, count=len(column), offset=column.offset * 4)


def _open_shard(data_dir: Path, shard: dict, n_vocab: int, verify: bool) -> list[np.ndarray]:
    import pyarrow as pa

    path, name = data_dir / shard["file"], shard["file"]
    rerun = RERUN.format(dir=data_dir)
    if Path(name).name != name or name in ("", ".", ".."):  # a tampered manifest must not reach outside data_dir
        raise DataError(f"the manifest names shard {name!r}, which is not a file name inside {data_dir}; {rerun}")
    if not path.exists():
        raise DataError(f"shard {name} is missing from {data_dir}; {rerun}")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise DataError(f"shard {name} is truncated or altered: {size} bytes on disk, the manifest says {shard['bytes']}; {rerun}")
    if verify and (sha := sha256_file(path)) != shard["sha256"]:
        raise DataError(f"shard {name} is corrupted: sha256 {sha[:16]}..., the manifest says {shard['sha256'][:16]}...; {rerun}")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        schema = reader.schema
        if schema.names != ["tokens"] or schema.field(0).type != pa.uint32():
            raise DataError(f"shard {name} holds {schema}, not one uint32 column `tokens`; {rerun}")
        segments = [_uint32_view(reader.get_batch(i).column(0)) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"shard {name} is not a readable Arrow IPC file ({exc}); {rerun}") from exc
    if (n := sum(len(s) for s in segments)) != shard["tokens"]:
        raise DataError(f"shard {name} holds {n} tokens, the manifest says {shard['tokens']}; {rerun}")
    if verify:
        pos = 0
        for seg in segments:
            if len(seg) and (top := int(seg.max())) >= n_vocab:
                at = pos + int(np.argmax(seg >= n_vocab))
                raise DataError(
                    f"shard {name} holds token id {top} (first bad id at position {at}), at or above the tokenizer's "
                    f"n_vocab={n_vocab}: it was not written with this manifest's tokenizer; {rerun}"
                )
            pos += len(seg)
    return segments


class SlidingWindowDataset(torch.utils.data.Dataset):
    """Window i is tokens [i*stride, i*stride + seq_len + 1): x is its first seq_len tokens, y its last."""

    def __init__(self, tokens: TokenShards | np.ndarray, seq_len: int, stride: int | None = None):
        stride = seq_len if stride is None else stride
        if seq_len < 1 or stride < 1:
            raise DataError(f"seq_len={seq_len} and stride={stride} must both be >= 1")
        n_tokens = len(tokens)
        if n_tokens < seq_len + 1:
            split = getattr(tokens, "split", "token")
            raise DataError(
                f"the {split} stream has {n_tokens} tokens, fewer than one window needs: the minimum is "
                f"seq_len + 1 = {seq_len + 1}; add text, or lower seq_len to at most {max(n_tokens - 1, 0)}"
            )
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self.n_windows = (n_tokens - seq_len - 1) // stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def window(self, i: int) -> np.ndarray:
        start = i * self.stride
        return self.tokens[start : start + self.seq_len + 1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n_windows:
            raise IndexError(f"window {i} out of range [0, {self.n_windows})")
        w = torch.from_numpy(self.window(i).astype(np.int64))
        return w[:-1], w[1:]

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) int64 inputs and targets for the given windows."""
        x = np.empty((len(indices), self.seq_len), dtype=np.int64)
        y = np.empty_like(x)
        for row, i in enumerate(indices.tolist()):
            w = self.window(i)
            x[row] = w[:-1]
            y[row] = w[1:]
        return torch.from_numpy(x), torch.from_numpy(y)


class DistributedWindowSampler:
    """Rank r's share of epoch e: every world_size-th window of a permutation seeded by (seed, e), from r.

    Position is global (`consumed` windows of the epoch, over all ranks), so the state restores exactly,
    and even to a different world size: the remaining windows are dealt out again from the same place.
    Each epoch drops the last n % world_size windows so every rank takes the same number of steps.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} is outside [0, world_size={world_size})")
        self.n, self.rank, self.world_size, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch, self.consumed = 0, 0
        self._order = None  # (epoch, permutation) cache

    def order(self) -> np.ndarray:
        """This epoch's order of all windows, the same on every rank."""
        if self._order is None or self._order[0] != self.epoch:
            # 4 bytes per window: 1B tokens at stride 1024 cost 4 MB; at stride 1, 4 GB (pick the stride with care)
            perm = np.arange(self.n, dtype=np.int32 if self.n < 2**31 else np.int64)
            if self.shuffle:
                np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch]))).shuffle(perm)
            self._order = (self.epoch, perm)
        return self._order[1]

    def remaining(self) -> np.ndarray:
        """This rank's windows still to come this epoch."""
        stop = self.consumed + (self.n - self.consumed) // self.world_size * self.world_size
        return self.order()[self.consumed + self.rank : stop : self.world_size]

    def advance(self, k: int) -> None:
        """Mark k of this rank's windows taken (and k on each other rank)."""
        self.consumed += k * self.world_size

    def set_epoch(self, epoch: int) -> None:
        # A resumed run calls set_epoch(saved epoch) again: keep its position; only a new epoch starts over.
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self):
        for i in self.remaining().tolist():
            self.advance(1)
            yield i

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "n": self.n, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed or state["shuffle"] != self.shuffle:
            raise DataError(
                f"sampler state is for n={state['n']} windows, seed={state['seed']}, shuffle={state['shuffle']}; "
                f"this run has n={self.n}, seed={self.seed}, shuffle={self.shuffle}: resume with the same data, "
                f"seq_len, stride and seed"
            )
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self._order = None


class WindowLoader:
    """Batches of (x, y), each (B, T) int64, on `device` (pinned, non-blocking copies on CUDA).

    Training (shuffle=True): `next_batch()` runs on across epochs; iterating gives the rest of the epoch;
    a last partial batch is dropped. Validation (shuffle=False): each iteration is one full, ordered pass
    over this rank's windows, the last batch possibly shorter; it has no position to save.
    """

    def __init__(self, dataset: SlidingWindowDataset, sampler: DistributedWindowSampler, batch_size: int,
                 device: str | torch.device = "cpu"):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.device = torch.device(device)
        self.train = sampler.shuffle

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __len__(self) -> int:
        per_rank = len(self.sampler)
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def __iter__(self):
        if not self.train:
            order = self.sampler.remaining()  # validation never advances: always the full pass
            for k in range(0, len(order), self.batch_size):
                yield self._to_device(*self.dataset.batch(order[k : k + self.batch_size]))
            return
        while len(idx := self.sampler.remaining()) >= self.batch_size:
            self.sampler.advance(self.batch_size)
            yield self._to_device(*self.dataset.batch(idx[: self.batch_size]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch; at the end of an epoch, the first batch of the next one."""
        if len(self.sampler.remaining()) < self.batch_size:
            self.sampler.set_epoch(self.sampler.epoch + 1)
        idx = self.sampler.remaining()[: self.batch_size]
        self.sampler.advance(self.batch_size)
        return self._to_device(*self.dataset.batch(idx))

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def token_ranges(tokens: TokenShards, ranges: list[tuple[int, int]]) -> TokenShards:
    """The stream of `tokens[a:b]` for each range, end to end (views where a range lies in one shard)."""
    return TokenShards([tokens[a:b] for a, b in ranges if b > a], tokens.manifest, tokens.split)


def complement(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for a, b in sorted(ranges):
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
    return out + ([(pos, n)] if pos < n else [])


class ReplayLoader:
    """Training batches of the new documents' windows, with a share `replay` of each batch's rows replayed from
    the earlier documents' windows (Ibrahim et al. 2024: replay keeps a continued model from forgetting).

    Row k of the stream of rows is a replayed one when floor((k+1)*r) > floor(k*r): exactly r of the rows over
    any stretch of batches, in the same places on every rank and after a resume. Each part has its own
    (seed, epoch) sampler, so a resumed run takes the very next rows of both."""

    def __init__(self, new: WindowLoader, old: WindowLoader | None, replay: float, batch_size: int):
        self.new, self.old, self.replay, self.batch_size = new, old, replay, batch_size
        self.dataset, self.device = new.dataset, new.device
        self.rows = 0  # rows drawn so far on each rank

    def _old_rows(self) -> int:
        k, b, r = self.rows, self.batch_size, self.replay
        return int(np.floor((k + b) * r + 1e-9) - np.floor(k * r + 1e-9))

    @staticmethod
    def _take(loader: WindowLoader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(loader.sampler.remaining()) < n:
            loader.sampler.set_epoch(loader.sampler.epoch + 1)
        idx = loader.sampler.remaining()[:n]
        loader.sampler.advance(n)
        return loader.dataset.batch(idx)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_old = self._old_rows() if self.old is not None else 0
        parts = [self._take(self.new, self.batch_size - n_old)] + ([self._take(self.old, n_old)] if n_old else [])
        self.rows += self.batch_size
        x, y = (torch.cat([p[i] for p in parts]) for i in (0, 1))
        return self.new._to_device(x, y)

    @property
    def epoch(self) -> int:
        return self.new.epoch

    def state_dict(self) -> dict:
        return {"replay": self.replay, "rows": self.rows, "new": self.new.state_dict(),
                "old": self.old.state_dict() if self.old is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if "new" not in state or state.get("replay") != self.replay:
            raise DataError(f"the checkpoint's data position is for replay={state.get('replay')}, this run has "
                            f"replay={self.replay}: resume with the same data and --replay")
        self.rows = state["rows"]
        self.new.load_state_dict(state["new"])
        if self.old is not None:
            self.old.load_state_dict(state["old"])


def replay_loader(train: WindowLoader, replay: float, seq_len: int, stride: int, batch_size: int, rank: int,
                  world_size: int, seed: int, data_dir: str | Path) -> ReplayLoader:
    """`train`'s split cut into the documents new since the manifest's `since` dataset and the rest."""
    tokens = train.dataset.tokens
    ranges = new_ranges(tokens.manifest, "train")
    if not ranges:
        raise DataError(f"data.replay={replay} trains on the documents new since an earlier dataset, but "
                        f"{data_dir}/manifest.json marks none: prepare with `gptmini prepare ... --since EARLIER_DIR` "
                        f"(and new documents), or leave data.replay unset to train on the whole split")

    def loader(part: TokenShards, what: str, part_seed: int) -> WindowLoader:
        ds = SlidingWindowDataset(part, seq_len, stride)
        if len(ds) // world_size < batch_size:
            raise DataError(f"the {what} documents of {data_dir} hold {len(part)} train tokens, {len(ds)} windows of "
                            f"seq_len={seq_len}: fewer than batch_size={batch_size} per rank; add text or lower "
                            f"batch_size or seq_len")
        return WindowLoader(ds, DistributedWindowSampler(len(ds), rank, world_size, part_seed), batch_size, train.device)

    new = loader(token_ranges(tokens, ranges), "new", seed)
    old = loader(token_ranges(tokens, complement(ranges, len(tokens))), "earlier", seed + 1) if replay > 0 else None
    return ReplayLoader(new, old, replay, batch_size)


class PieceWindows:
    """Evaluation windows that never read across an end-of-text. The stream is cut at its end-of-text tokens
    into pieces (a document, or a run of val chunks within one); each piece is read on its own, after an
    end-of-text, in windows of at most seq_len targets: window i predicts tokens [start, start + n) from the
    tokens just before each. The end-of-text itself is no target (at a val chunk's end it marks a cut, not an
    end of the text). Short windows are padded (targets -1); `multiple` pads the window count with empty
    windows so every rank gets the same number and none is dropped. `piece[i]` is window i's piece, the unit
    the gate pairs two models on."""

    def __init__(self, tokens: TokenShards | np.ndarray, seq_len: int, eot: int, multiple: int = 1):
        self.tokens, self.seq_len, self.eot = tokens, seq_len, eot
        begins, ends = piece_bounds(tokens, eot)
        self.n_pieces = len(begins)
        starts, lengths, piece = [], [], []
        for j, (b, e) in enumerate(zip(begins.tolist(), ends.tolist())):
            at = np.arange(b, e, seq_len)
            starts.append(at)
            lengths.append(np.minimum(seq_len, e - at))
            piece.append(np.full(len(at), j))
        pad = (-sum(len(a) for a in starts)) % multiple
        self.start = np.concatenate([*starts, np.zeros(pad, np.int64)]).astype(np.int64)
        self.length = np.concatenate([*lengths, np.zeros(pad, np.int64)]).astype(np.int64)
        self.piece = np.concatenate([*piece, np.full(pad, -1)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.start)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.full((len(indices), self.seq_len), self.eot, dtype=np.int64)
        y = np.full_like(x, -1)
        for row, i in enumerate(indices.tolist()):
            start, n = int(self.start[i]), int(self.length[i])
            if n == 0:
                continue
            y[row, :n] = self.tokens[start : start + n]
            if start == 0:
                x[row, 1:n] = y[row, : n - 1]
            else:
                x[row, :n] = self.tokens[start - 1 : start + n - 1]
        return torch.from_numpy(x), torch.from_numpy(y)


def piece_bounds(tokens: TokenShards | np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """(begins, ends) of the non-empty pieces between end-of-text tokens: piece j is tokens[begins[j]:ends[j]]."""
    ends = _positions(tokens, eot)
    if not len(ends) or ends[-1] != len(tokens) - 1:
        ends = np.append(ends, len(tokens))  # a stream that does not end with end-of-text
    begins = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > begins
    return begins[keep], ends[keep]


def _positions(tokens: TokenShards | np.ndarray, value: int) -> np.ndarray:
    """Stream positions of `value`, shard by shard (a memory map is scanned, never copied whole)."""
    if isinstance(tokens, np.ndarray):
        return np.flatnonzero(tokens == value)
    found = [np.flatnonzero(seg == value) + off for seg, off in zip(tokens.segments, tokens.offsets[:-1].tolist())]
    return np.concatenate(found) if found else np.empty(0, np.int64)


def _empty(data_dir: str | Path, split: str) -> str:
    return (f"the {split} split of {data_dir} is empty; raise --val-fraction or add text, then re-run "
            f"`gptmini prepare ... --out {data_dir} --force`")


def piece_loader(tokens: TokenShards | np.ndarray, eot: int, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu") -> WindowLoader:
    windows = PieceWindows(tokens, seq_len, eot, multiple=world_size)
    sampler = DistributedWindowSampler(len(windows), rank, world_size, shuffle=False)
    return WindowLoader(windows, sampler, batch_size, device)


def build_loaders(
    data_dir: str | Path,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
    verify: bool = True,
    val_seq_len: int | None = None,
) -> tuple[WindowLoader, WindowLoader | None]:
    """(train, val) loaders over a prepared folder; val (`PieceWindows`) is None when its split is empty.

    `vocab_size` (the model's) is checked against the manifest's tokenizer: every id must have a row. Validation
    windows are `val_seq_len` long (default: seq_len).
    """
    stride = seq_len if stride is None else stride
    train_tokens = TokenShards.open(data_dir, "train", verify)
    manifest = train_tokens.manifest
    if vocab_size is not None and vocab_size < manifest["n_vocab"]:
        raise DataError(
            f"model vocab_size={vocab_size} is below the shards' n_vocab={manifest['n_vocab']} "
            f"({manifest['tokenizer']}); set vocab_size={manifest['vocab_size']}"
        )
    val_tokens = TokenShards.open(data_dir, "val", verify)
    if not len(val_tokens):
        warnings.warn(_empty(data_dir, "val") + ": no validation loader", stacklevel=2)
    return window_loaders(train_tokens, val_tokens, manifest["eot_token"], seq_len, stride, batch_size, rank,
                          world_size, seed, device, val_seq_len, where=f"the train split of {data_dir}")


def window_loaders(
    train_tokens: TokenShards | np.ndarray,
    val_tokens: TokenShards | np.ndarray | None,
    eot: int,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    val_seq_len: int | None = None,
    where: str = "the training tokens",
) -> tuple[WindowLoader, WindowLoader | None]:
    """(train, val) loaders over two token streams, a prepared folder's splits or arrays in memory: shuffled
    sliding windows to train on, `PieceWindows` to validate on (None for an empty or missing val stream)."""
    stride = seq_len if stride is None else stride
    train_ds = SlidingWindowDataset(train_tokens, seq_len, stride)
    per_rank = len(train_ds) // world_size
    if per_rank < batch_size:
        need = seq_len + 1 + stride * (world_size * batch_size - 1)
        raise DataError(
            f"{where} has {len(train_tokens)} tokens: {len(train_ds)} windows of seq_len={seq_len} "
            f"at stride={stride}, {per_rank} per rank, fewer than batch_size={batch_size}; the minimum is {need} tokens "
            f"for world_size={world_size}: add text, or lower batch_size, seq_len or stride"
        )
    train = WindowLoader(train_ds, DistributedWindowSampler(len(train_ds), rank, world_size, seed), batch_size, device)
    if val_tokens is None or not len(val_tokens):
        return train, None
    return train, piece_loader(val_tokens, eot, val_seq_len or seq_len, batch_size, rank, world_size, device)


class BatchStream:
    """Any iterable of (x, y) batches (a torch DataLoader, a list) as a loader on `device`: `next_batch` runs
    on across epochs, as `WindowLoader.next_batch` does, and iterating is one pass. Its position is a count
    of batches, not a sampler's: a checkpoint records it, but only a `WindowLoader` resumes at the exact
    next batch."""

    def __init__(self, batches, device: str | torch.device = "cpu"):
        self.batches, self.device = batches, torch.device(device)
        self.epoch, self.taken, self._it = 0, 0, None

    def __iter__(self):
        """One pass, on the device: how a validation loader is read."""
        for x, y in self.batches:
            yield x.to(self.device), y.to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.batches)
        try:
            x, y = next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.batches)
            try:
                x, y = next(self._it)
            except StopIteration:
                raise DataError("the training loader yields no batches; give it at least one (x, y) batch") from None
        self.taken += 1
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.taken}

    def load_state_dict(self, state: dict) -> None:
        """The counts only: the iterable starts again from its beginning."""
        self.epoch, self.taken = state.get("epoch", 0), state.get("batches", 0)

__all__ = ["SPLITS", "TokenShards", "SlidingWindowDataset", "PieceWindows", "DistributedWindowSampler", "WindowLoader",
           "BatchStream", "build_loaders", "window_loaders", "piece_bounds", "piece_loader"]

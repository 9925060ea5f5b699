"""Run metrics: one JSON object per line in RUN/metrics.jsonl, and matplotlib plots in RUN/plots/.

Records carry a `kind` ("train" or "val") and a `step`. A resumed run first drops the records after
its checkpoint's step, so the file always reads as one uninterrupted run.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from gptmini.files import atomic_path, write_atomic


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        # One write per record, flushed: a kill -9 loses at most the line being written.
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def truncate_after(self, step: int) -> None:
        """Keep what the checkpoint at `step` had seen; later records belong to the lost work."""
        kept = [r for r in self.read() if r["step"] <= step]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill; everything before it is whole
                break
    return records


def train_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r.get("kind") == "train"}


def draw_loss(ax: Any, records: list[dict[str, Any]]) -> None:
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("gptmini loss")
    ax.grid(alpha=0.3)
    ax.legend()


def draw_lr(ax: Any, records: list[dict[str, Any]]) -> None:
    train = [r for r in records if r.get("kind") == "train"]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title("warmup + cosine schedule")
    ax.grid(alpha=0.3)


def plot(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write plots/loss.png (train + val) and plots/lr.png; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_save(draw, records, size, out_dir / name)
            for draw, size, name in ((draw_loss, (7, 4), "loss.png"), (draw_lr, (7, 3), "lr.png"))]


def curves_png(records: list[dict[str, Any]]) -> bytes:
    """The loss and LR curves side by side as one PNG: what `GPTTrainer` shows live in a notebook."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.5))
    draw_loss(fig.add_subplot(1, 2, 1), records)
    draw_lr(fig.add_subplot(1, 2, 2), records)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    return buf.getvalue()


def _save(draw: Any, records: list[dict[str, Any]], size: tuple[int, int], path: Path) -> Path:
    # A bare Figure, not pyplot: the trainer draws without switching the process's backend, which in a
    # notebook would stop the user's own plots from showing inline.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    draw(fig.add_subplot(), records)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path

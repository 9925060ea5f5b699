"""The Python API: what `from gptmini import GPTOSSMini, GPTTrainer` gives a notebook (docs/python-api.md).

`GPTOSSMini` here is the model of `gptmini.model` plus `generate`, `generate_with_retrieval` and
`from_pretrained`. It is a subclass
rather than methods on the model because both belong to layers above it: `generate` is the library's one
decode loop and sampler (`gptmini.generate`), `from_pretrained` is the one loader (`weights.load_model`)
and the registry's `models:/` resolution, and gptmini/model.py imports nothing but torch. The subclass adds
no parameters or buffers, so its state dict, checkpoints, and every library function that takes a model
(quantize, the serving engine, the HF export) treat it as the model it is.

`GPTTrainer` runs the recipe of `gptmini train` in this process, on the caller's model: the run is built by
`trainer.start_run`, stepped by `trainer.loop` and closed by `trainer.finish`, the same functions the
command runs, so the same config, data and seed give the same losses. It reports to a `LiveView`, a
`trainer.Tracker` that draws the loss and LR curves and a progress bar in Jupyter.
"""
from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gptmini import checkpoint, generate, loss, rag, registry, trainer, weights
from gptmini.config import Config, ConfigError, apply_overrides, from_preset, section_types, validate
from gptmini.data.loader import BatchStream, TokenShards, WindowLoader, window_loaders
from gptmini.data.prepare import read_manifest
from gptmini.data.sources import DataError
from gptmini.device import pick_device
from gptmini.engine import prompt_ids
from gptmini.errors import UserError
from gptmini.metrics import curves_png
from gptmini.model import GPTOSSMini as Model, KVCache
from gptmini.parallel import DistEnv
from gptmini.retrieval import Index, Passage
from gptmini.tokenizer import Tokenizer, check_vocab


class GPTOSSMini(Model):
    """`GPTOSSMini(**seed_config)` or `GPTOSSMini(ModelConfig(...))`, with `generate` and `from_pretrained`."""

    def forward(self, idx: Tensor, targets: Tensor | None = None, *,
                cache: KVCache | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab) of idx (B, T); given targets (B, T), -1 ignored, `(logits, loss)` as nanoGPT's
        `logits, loss = model(x, y)`: the mean cross-entropy, plus the MoE load-balancing term in training mode,
        which is what `gptmini train` minimises. The library's callers pass no targets and choose their loss in
        `gptmini.loss`."""
        logits = super().forward(idx, cache=cache)
        if targets is None:
            return logits
        return logits, loss.cross_entropy(logits, targets) + loss.balance_loss(self)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 50, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """(B, T) prompt ids → (B, T + new) ids on the model's device, as in nanoGPT and Hugging Face.
        Temperature 0 is greedy; rows that emitted `eos_token_id` are padded with it. This is
        `gptmini.generate.generate`, with its KV cache."""
        return generate.generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, eos_token_id=eos_token_id, generator=generator)

    @torch.no_grad()
    def generate_with_retrieval(self, prompt: str, tokenizer: Tokenizer, index: Index | str | Path,
                                max_new_tokens: int = 50, k: int = 1, stride: int | None = None,
                                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                                generator: torch.Generator | None = None) -> tuple[str, list[Passage]]:
        """(continuation, passages read) of `prompt` after the `k` passages of `index` that best match its last
        32 tokens, retrieved again every `stride` new tokens (In-Context RALM; docs/rag.md). `index` is an
        `Index`, a prepared folder, an index file, or a `models:/` URI (that version's own index). This is
        `gptmini.rag.generate`, the loop of `gptmini generate --rag` and of the server."""
        opts = rag.RagOptions(k=k, stride=stride)
        rag.check_options(opts)
        complete = rag.model_complete(self, tokenizer, temperature, top_k, top_p, generator)
        result = rag.generate(open_index(index), tokenizer, prompt_ids(tokenizer, prompt), max_new_tokens, complete,
                              self.config.max_seq_len, opts)
        return tokenizer.decode([t for t in result.ids if t != tokenizer.eot_token]), result.citations

    @classmethod
    def from_pretrained(cls, path_or_uri: str | Path, device: str | torch.device = "cpu",
                        tracking_uri: str | None = None) -> tuple[GPTOSSMini, Tokenizer]:
        """(model in eval mode, its tokenizer) from a run folder (its final/, else best/, else its latest
        checkpoint), a weights folder, a training checkpoint, or a registry URI such as
        `models:/gptmini@production` (resolved on $MLFLOW_TRACKING_URI, or `tracking_uri`, and downloaded once
        into the local cache). The tokenizer is the one the weights were trained with: a published encoding
        by name, or the `tokenizer.tiktoken` file saved beside them."""
        source = str(path_or_uri)
        path = registry.resolve_model_uri(source, tracking_uri) if source.startswith("models:/") else source
        return weights.load_model(path, device, cls)


def open_index(index: Index | str | Path, tracking_uri: str | None = None) -> Index:
    """An `Index`, from a prepared folder, an index file, or a registry version's `models:/` URI."""
    if isinstance(index, Index):
        return index
    source = str(index)
    if not source.startswith("models:/"):
        return Index.open(source)
    found = registry.resolve_index(source, tracking_uri)
    if found is None:
        raise UserError(f"{source} carries no retrieval index; pass a prepared folder indexed by "
                        "`gptmini index DATA_DIR`")
    return Index(found)


# GPTTrainer's keyword settings: any field of the data, optim and train sections, by its own name.
SETTINGS = {key: section for section in ("data", "optim", "train") for key in section_types(section)}
TokenIds = Sequence[int] | np.ndarray | Tensor


class GPTTrainer:
    """`GPTTrainer(model, tokenizer, train_data, **settings).train()`: `gptmini train`'s recipe in this process.

    `train_data` is a prepared folder (`gptmini prepare --out DIR`), text (a str), or token ids (a list, array
    or 1-D tensor). Text is encoded with `tokenizer` and ended with end-of-text, as `gptmini prepare` ends a
    document. For text and ids, the last `val_fraction` of the tokens is the validation split unless
    `val_data` gives one. `settings` are the fields of the `[data]`, `[optim]` and `[train]` sections by name
    (`steps=200, lr=1e-3, batch_size=8, seq_len=64, grad_accum=2, out_dir="runs/nb"`); unset ones come from
    `config`, else the demo preset. The model keeps its own config and weights.
    """

    def __init__(self, model: Model, tokenizer: Tokenizer, train_data: str | Path | TokenIds | None = None,
                 val_data: str | TokenIds | None = None, *, config: Config | None = None, val_fraction: float = 0.1,
                 live: bool | None = None, **settings: Any):
        cfg = copy.deepcopy(config) if config is not None else from_preset("demo")
        if config is None:
            cfg.train.out_dir = f"runs/notebook-{time.strftime('%Y%m%d-%H%M%S')}"
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"GPTTrainer got unknown setting(s) {', '.join(unknown)}; "
                              f"valid settings: {', '.join(SETTINGS)}")
        overrides: dict[str, dict[str, Any]] = {}
        for key, value in settings.items():
            overrides.setdefault(SETTINGS[key], {})[key] = str(value) if isinstance(value, Path) else value
        apply_overrides(cfg, overrides, "GPTTrainer")
        cfg.model = copy.deepcopy(model.config)
        validate(cfg, need_data=False)
        if cfg.train.parallel != "none":
            raise ConfigError(f"train.parallel = {cfg.train.parallel!r}: GPTTrainer trains in this one process; "
                              f"for ddp or fsdp run `torchrun ... -m gptmini.train`")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction = {val_fraction} must be in (0, 1)")
        try:
            check_vocab(model.config.vocab_size, tokenizer)
        except UserError as exc:
            raise ConfigError(f"model.vocab_size: {exc}") from None
        if model.config.tokenizer != tokenizer.name:
            # The weights will be trained on this tokenizer's ids: the config saved with every checkpoint must
            # name it, or loading them back would pair them with another tokenizer. As `gptmini train` takes
            # the data's tokenizer.
            print(f"note: the model's config names tokenizer {model.config.tokenizer!r}; it is trained with "
                  f"{tokenizer.name!r}, which its checkpoints will name", flush=True)
            model.config.tokenizer = cfg.model.tokenizer = tokenizer.name
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.train_data, self.val_data, self.val_fraction = train_data, val_data, val_fraction
        self.live = in_notebook() if live is None else live
        self.run: trainer.Run | None = None
        self.unigram: float | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The run's metrics records (RUN/metrics.jsonl): `kind` "train" (loss, lr, grad_norm, ...) or "val"."""
        return self.run.log.read() if self.run is not None else []

    @property
    def out_dir(self) -> Path:
        return Path(self.config.train.out_dir)

    def train(self, train_loader: Iterable | None = None, val_loader: Iterable | None = None, *,
              steps: int | None = None) -> dict[str, Any]:
        """Train on the loaders given, else on `train_data`, up to `steps` optimizer steps in all: by default
        one more pass over `train_loader` when one is given, else the `steps` setting. A loader is a
        `gptmini.data.loader.WindowLoader` or any iterable of (x, y) batches (a torch DataLoader over
        `SlidingWindowDataset`, say), run through again at its end. Calling `train` again with more steps
        continues the same run. Interrupting the kernel once saves a checkpoint at the next step and stops.
        Returns the run's summary (summary.json); the model is left in eval mode."""
        cfg = self.config
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"steps = {steps}; it must be a positive integer")
        if self.run is None:
            self.run = self._start(train_loader, val_loader)
        elif train_loader is not None:
            self.run.train_loader, self.run.val_loader = self._loader(train_loader), self._val(val_loader)
        run = self.run
        if steps is not None:
            cfg.train.steps = int(steps)
        elif train_loader is not None and hasattr(train_loader, "__len__"):
            cfg.train.steps = run.state.step + max(1, len(train_loader) // cfg.train.grad_accum)
        if run.state.step >= cfg.train.steps:
            raise ConfigError(f"the run is already at step {run.state.step}; ask for more: train(steps=N) with "
                              f"N > {run.state.step}")
        preempt = trainer.Preemption()
        try:
            with LiveView(run, self.live) as view:
                status, last_val = trainer.loop(run, view, preempt)
                result = trainer.finish(run, view, status, last_val, self.unigram)
        finally:
            preempt.restore()
            self.model.eval()
        return result

    def _loader(self, loader: Iterable) -> WindowLoader | BatchStream:
        return loader if isinstance(loader, WindowLoader) else BatchStream(loader, self.env.device)

    def _val(self, loader: Iterable | None) -> WindowLoader | BatchStream | None:
        return None if loader is None else self._loader(loader)

    def _start(self, train_loader: Iterable | None, val_loader: Iterable | None) -> trainer.Run:
        cfg, t_start = self.config, time.time()
        self.env = DistEnv(0, 0, 1, pick_device(cfg.train.device))
        resume_from = trainer.resume_point(cfg)
        trainer.set_deterministic(cfg.train.deterministic)
        if train_loader is not None:
            train, val = self._loader(train_loader), self._val(val_loader)
        else:
            train, val = self._data_loaders()
        if isinstance(train, WindowLoader):
            tokens = train.dataset.tokens
            self.unigram = trainer.unigram_entropy(tokens.segments if isinstance(tokens, TokenShards) else [tokens])
        run, rng = trainer.start_run(cfg, self.env, self.model, train, val, self.tokenizer, resume_from, t_start)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        return run

    def _data_loaders(self) -> tuple[WindowLoader, WindowLoader | None]:
        cfg, data, tok = self.config, self.train_data, self.tokenizer
        if data is None:
            raise UserError("no training data: pass train_data to GPTTrainer (a prepared folder, text or token ids), "
                            "or loaders to train(train_loader, val_loader)")
        if isinstance(data, Path) or (isinstance(data, str) and is_prepared_folder(data)):
            manifest = read_manifest(data)
            if manifest["tokenizer"] != tok.name:
                raise DataError(f"{data} is tokenized with {manifest['tokenizer']}, the tokenizer given is {tok.name}; "
                                f"pass the tokenizer the folder was prepared with")
            cfg.data.data_dir = str(data)
            return trainer.folder_loaders(cfg, self.env)
        ids = self._ids(data)
        if self.val_data is not None:
            train_ids, val_ids = ids, self._ids(self.val_data)
        else:
            n_val = int(len(ids) * self.val_fraction)
            train_ids, val_ids = ids[: len(ids) - n_val], ids[len(ids) - n_val:]
        # Validation reads windows of the model's whole context, as `gptmini train` does.
        return window_loaders(train_ids, val_ids, tok.eot_token, cfg.seq_len, cfg.stride, cfg.data.batch_size,
                              seed=cfg.train.seed, device=self.env.device, val_seq_len=cfg.model.max_seq_len)

    def _ids(self, data: str | TokenIds) -> np.ndarray:
        if isinstance(data, str):
            return np.array(self.tokenizer.encode(data) + [self.tokenizer.eot_token], dtype=np.uint32)
        ids = np.asarray(data.cpu() if isinstance(data, Tensor) else data)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise DataError(f"token ids must be one flat sequence of integers, got {ids.dtype} of shape {ids.shape}; "
                            f"concatenate your documents, each ended with end-of-text ({self.tokenizer.eot_token})")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.model.config.vocab_size):
            raise DataError(f"token ids must lie in [0, vocab_size={self.model.config.vocab_size}), got "
                            f"{int(ids.min())}..{int(ids.max())}; encode with the model's tokenizer")
        return ids.astype(np.uint32)


class LiveView(trainer.Tracker):
    """The trainer's reports, shown in Jupyter: the loss and LR curves redrawn at each log step and each
    evaluation, and tqdm's notebook progress bar. Outside a notebook (`live=False`) it shows nothing, and
    the log lines `gptmini train` prints are the progress."""

    def __init__(self, run: trainer.Run, live: bool):
        self.run, self.live = run, live
        self.bar = self.figure = None
        if live:
            from IPython.display import display
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.cfg.train.steps, initial=run.state.step, unit="step", desc="training")
            self.figure = display(self.image(), display_id=True)

    def image(self) -> Any:
        from IPython.display import Image

        return Image(data=curves_png(self.run.log.read()), format="png")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.live:
            return
        if "loss" in metrics:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        self.figure.update(self.image())

    def close(self, status: str) -> None:
        if self.bar is not None:
            self.bar.close()


def is_prepared_folder(text: str) -> bool:
    """Whether a str given as data names a `gptmini prepare` folder rather than being the text itself."""
    try:
        return "\n" not in text and (Path(text) / "manifest.json").is_file()
    except OSError:  # a name too long for a path: text
        return False


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython, which cannot show an updating image)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config

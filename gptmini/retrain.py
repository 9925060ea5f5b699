"""Day-two retraining: the decisions behind continuing from production on a corpus that grew.

- `check_parent`: a continued run must have the parent's model config and read data in its tokenizer;
- `continue_steps`: how long to continue, from how much new text there is (a rule with a cap);
- `skip_reason`: nothing new since production's dataset, under the same settings, means nothing to train.

Plain functions over plain data, so the trainer, the CLI and the flow share them and the tests pin them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from gptmini.errors import UserError

# Continuing passes over the new train tokens this many times (the replayed rows come on top). Ibrahim et al.
# (2024) continue for as many tokens as the new data holds; two passes suit our small increments, where one
# pass of a few thousand tokens barely moves a model trained for hundreds of steps.
PASSES = 2.0
MIN_STEPS = 10  # warm-up and decay need room


class ParentMismatch(UserError):
    """The weights to continue from do not fit this run's model config or data."""


def check_parent(model: dict[str, Any], parent: dict[str, Any], data_tokenizer: str, where: str) -> None:
    """`model`: this run's ModelConfig as a dict (its tokenizer already the data's); `parent`: the config of
    the weights at `where`. Dropout may differ (it is a training setting); nothing else may."""
    if parent.get("tokenizer") != data_tokenizer:
        raise ParentMismatch(
            f"--init-from {where}: the model reads {parent.get('tokenizer')!r} tokens but the data is tokenized with "
            f"{data_tokenizer!r}; prepare the data with the parent's tokenizer (`gptmini prepare ... --tokenizer "
            f"{parent.get('tokenizer')}`)")
    differ = {k: (parent.get(k), v) for k, v in model.items() if k != "dropout" and parent.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}={theirs!r} (this run: {ours!r})" for k, (theirs, ours) in sorted(differ.items()))
        raise ParentMismatch(f"--init-from {where}: its model config differs: {shown}; train with the parent's "
                             f"model settings (the same --preset, no --model.* overrides)")


def continue_steps(new_train_tokens: int, tokens_per_step: int, replay: float, cap: int,
                   passes: float = PASSES) -> int:
    """Steps to continue for: `passes` passes over the new train tokens, of which each step holds
    tokens_per_step * (1 - replay); at least MIN_STEPS, at most `cap` (the preset's from-scratch steps: a
    continued run never costs more than training anew)."""
    if new_train_tokens <= 0:
        return 0
    new_per_step = tokens_per_step * (1.0 - replay)
    return max(min(MIN_STEPS, cap), min(cap, math.ceil(passes * new_train_tokens / new_per_step)))


def settings_key(**settings: Any) -> str:
    """A digest of the training settings that decide what a run makes of its data (preset, steps, extra args,
    tokenizer, ...): equal digests on equal data make the same model."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def skip_reason(production: dict[str, str] | None, version: str | None, inputs_key: str, settings: str,
                continuing: bool, earlier: list[tuple[str, dict[str, str]]] = ()) -> str | None:
    """Why a scheduled run has nothing to do, or None. `production`: the production version's tags
    (`data_inputs_key`, `train_settings`). Nothing to do when its dataset had exactly these inputs and either
    this run continues from it (there is no new text to learn) or it was trained with the same settings (a
    run from scratch would make the same model again). `earlier`: the registered versions' numbers and tags;
    nothing to do either when one of them already continued production on these inputs with these settings and
    the gate kept production: the same run would only register the same rejected model again, every night."""
    if production is None:
        return None
    if continuing:
        for number, tags in earlier:
            if (tags.get("parent_version"), tags.get("data_inputs_key"), tags.get("train_settings")) == \
                    (str(version), inputs_key, settings):
                return (f"v{number} already continued production v{version} on this data with these settings and "
                        f"was not promoted (gate: {tags.get('gate.decision', 'none')})")
    if production.get("data_inputs_key") != inputs_key:
        return None
    if continuing:
        return f"production v{version} already trained on this data (no new documents since its dataset)"
    if production.get("train_settings") == settings:
        return f"production v{version} already trained on this data with the same settings"
    return None


def model_dict(model_config: Any) -> dict[str, Any]:
    return dataclasses.asdict(model_config)

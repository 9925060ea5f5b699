"""The `prepare-data` flow: train-gpt's data half (download -> tokenize) on its own, to warm the shards of a
corpus once before many workers train on it.

Every worker that shares $GPTMINI_STATE then finds `tokenize` (and a remote source's `download`) cached:
the shards and the tasks' persisted results both live there (`tasks.result_storage()`), not in a worker's
own PREFECT_HOME.
"""
from __future__ import annotations

import json

from prefect import flow

from flows import tasks
from flows.train_gpt import DEFAULT_SOURCES, check_data_parameters, check_sources


@flow(name="prepare-data")
def prepare_data(sources: list[str] = DEFAULT_SOURCES, tokenizer: str = "cl100k_base",
                 val_fraction: float = 0.05) -> dict:
    """Download and tokenize `sources` into $GPTMINI_STATE/data/shards-<key>, as train-gpt does with the same
    parameters; returns `{"data_dir", "manifest_sha256"}`.

    Args:
        sources: wikipedia:TITLE, http(s)://URL, embedded:python-docs, local files/folders/globs.
        tokenizer: cl100k_base, gpt2 or o200k_base.
        val_fraction: the share of the text held out for validation, in (0, 1), dealt in chunks of about 256 tokens.
    """
    check_data_parameters(tokenizer, val_fraction)
    sources = check_sources(sources)
    data_root = tasks.state_dir() / "data"
    inputs = tasks.fetch(sources, str(data_root / "cache"))
    return tasks.prepare_shards(inputs, tokenizer, val_fraction, str(data_root))


if __name__ == "__main__":
    print(json.dumps(prepare_data(), indent=1))

"""Retrieval-augmented generation and its measurement, after In-Context RALM (Ram et al., TACL 2023).

A frozen model reads the best BM25 passages before its prompt: `retrieval.build_context` lays out
[eot] passage [eot] prompt within the context, and `generate` continues it, retrieving again every `stride`
new tokens with a query of the latest `QUERY_TOKENS` tokens. Decoding is left to a `complete` function
(context ids, n) -> new ids, so the CLI (`generate.generate`), the server (its engine) and the flow's samples
share this one loop.

`evaluate` measures val bits per byte with and without retrieval on the same val pieces, paired as the gate
pairs two models: retrieval from every passage; from every passage but those of the val text's own document
(RETRO's caution: part of a gain can be overlap with the evaluated text); a random passage of the same length
(more context against relevant context); and recall@k of the val pieces' own documents.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from gptmini.errors import UserError
from gptmini.evaluate import LN2, token_bytes, window_sums
from gptmini.gate import paired
from gptmini.generate import generate as generate_ids
from gptmini.generate import sampling_mask
from gptmini.retrieval import MAX_K, QUERY_TOKENS, Index, Passage, build_context, query_of
from gptmini.tokenizer import Tokenizer

Complete = Callable[[list[int], int], list[int]]  # (context ids, n) -> at most n new ids, ending at eot if any
MAX_STRIDE = 4096


@dataclass(frozen=True)
class RagOptions:
    k: int = 1  # passages prepended
    stride: int | None = None  # retrieve again every `stride` new tokens; None: once, before the first
    query_tokens: int = QUERY_TOKENS


def check_options(opts: RagOptions) -> None:
    if not 1 <= opts.k <= MAX_K:
        raise UserError(f"retrieval k={opts.k} is out of range; use 1 to {MAX_K}")
    if opts.stride is not None and not 1 <= opts.stride <= MAX_STRIDE:
        raise UserError(f"retrieval stride={opts.stride} is out of range; use 1 to {MAX_STRIDE}, or none to "
                        f"retrieve once")
    if not 1 <= opts.query_tokens <= 1024:
        raise UserError(f"retrieval query_tokens={opts.query_tokens} is out of range; use 1 to 1024")


@dataclass
class RagResult:
    ids: list[int]  # the new tokens
    citations: list[Passage] = field(default_factory=list)  # every passage read, in the order first read


def generate(index: Index, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int, complete: Complete,
             seq_len: int, opts: RagOptions = RagOptions()) -> RagResult:
    """Continue `prompt` (its ids, starting with end-of-text) with the best passages before it, retrieving
    again every `opts.stride` tokens from a context built anew."""
    out, cited = [], {}
    while len(out) < max_new_tokens:
        n = min(opts.stride or max_new_tokens, max_new_tokens - len(out))
        context, found = retrieve(index, tokenizer, prompt + out, seq_len - n, opts)
        new = complete(context, n)
        out += new
        cited.update((p.id, p) for p in found if p.id not in cited)
        if len(new) < n or (new and new[-1] == tokenizer.eot_token):
            break
    return RagResult(out, list(cited.values()))


def retrieve(index: Index, tokenizer: Tokenizer, prefix: list[int], budget: int,
             opts: RagOptions) -> tuple[list[int], list[Passage]]:
    """One retrieval: the context of at most `budget` tokens for `prefix`, and the passages in it."""
    found = index.search(query_of(tokenizer, prefix, opts.query_tokens), opts.k)
    return build_context(tokenizer, [tokenizer.encode(p.text) for p in found], prefix, budget), found


def model_complete(model: nn.Module, tokenizer: Tokenizer, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, generator: torch.Generator | None = None) -> Complete:
    """`complete` by `generate.generate` on one model, in this process."""
    device = next(model.parameters()).device
    allowed = sampling_mask(tokenizer, model.config.vocab_size, device)

    def complete(context: list[int], n: int) -> list[int]:
        row = generate_ids(model, [context], n, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=tokenizer.eot_token, generator=generator, allowed=allowed)[0]
        return row[len(context):]
    return complete


def generate_text(model: nn.Module, tokenizer: Tokenizer, index: Index, prompt: str, max_new_tokens: int = 64,
                  opts: RagOptions = RagOptions(), temperature: float = 0.8, top_k: int | None = 50,
                  seed: int = 0) -> tuple[str, list[Passage]]:
    """`generate.generate_text` with retrieval: the continuation and the passages it read."""
    device = next(model.parameters()).device
    complete = model_complete(model, tokenizer, temperature, top_k if top_k and top_k > 0 else None,
                              generator=torch.Generator(device=device).manual_seed(seed))
    result = generate(index, tokenizer, [tokenizer.eot_token] + tokenizer.encode(prompt), max_new_tokens, complete,
                      model.config.max_seq_len, opts)
    return tokenizer.decode([t for t in result.ids if t != tokenizer.eot_token]), result.citations


# Measuring it

MODES = ("none", "all", "filtered", "random")


@dataclass
class Segment:
    piece: int
    context: list[int]  # what the model reads before the targets
    targets: list[int]
    documents: tuple[str, ...] = ()  # of the passages in the context


def segments(tokenizer: Tokenizer, index: Index, val: Sequence[tuple[str, str]], seq_len: int, stride: int,
             opts: RagOptions, seed: int = 0, modes: Sequence[str] = MODES) -> dict[str, list[Segment]]:
    """Each val piece's tokens in runs of `stride` targets, under each of `modes`, with the same targets and
    the same prefix budget: every mode but `none` spends part of the window on passages."""
    rng, out = random.Random(seed), {m: [] for m in modes}
    eot = tokenizer.eot_token
    for j, (document, text) in enumerate(val):
        ids = tokenizer.encode(text)
        for a in range(0, len(ids), stride):
            targets, prefix = ids[a:a + stride], [eot] + ids[:a]
            budget = seq_len - len(targets)
            query = query_of(tokenizer, prefix, opts.query_tokens)
            found = {"all": index.search(query, opts.k)} if "all" in modes or "random" in modes else {}
            if "filtered" in modes:
                found["filtered"] = index.search(query, opts.k, document)
            passages = {m: [tokenizer.encode(p.text) for p in ps] for m, ps in found.items()}
            # A random passage as long, in tokens, as what retrieval put in the window.
            used = len(build_context(tokenizer, passages.get("all", []), prefix, budget)) - len(prefix[-budget:])
            filler: list[int] = []
            while used and len(filler) < used:
                filler += tokenizer.encode(index.random(rng).text)
            passages["random"] = [filler[:max(used - 1, 0)]] if used else []
            passages["none"] = []
            docs = {m: tuple(p.document for p in ps) for m, ps in found.items()}
            for mode in modes:
                out[mode].append(Segment(j, build_context(tokenizer, passages[mode], prefix, budget), targets,
                                         docs.get(mode, ())))
    return out


@torch.no_grad()
def segment_sums(model: nn.Module, tokenizer: Tokenizer, segs: list[Segment], n_pieces: int,
                 batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(nats, bytes) of each piece's targets, each segment read after its context."""
    device = next(model.parameters()).device
    nbytes = token_bytes(tokenizer, model.config.vocab_size, device)
    sums = np.zeros((n_pieces, 3))
    model.eval()
    for b in range(0, len(segs), batch_size):
        batch = segs[b:b + batch_size]
        width = max(len(s.context) + len(s.targets) - 1 for s in batch)
        x = torch.full((len(batch), width), tokenizer.eot_token, dtype=torch.long)
        y = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, s in enumerate(batch):
            seq = s.context + s.targets
            x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            y[row, len(s.context) - 1:len(seq) - 1] = torch.tensor(s.targets)
        np.add.at(sums, [s.piece for s in batch], window_sums(model, x.to(device), y.to(device), nbytes).cpu().numpy())
    return sums[:, 0], sums[:, 1]


def recall_at(index: Index, tokenizer: Tokenizer, val: Sequence[tuple[str, str]], ks: Sequence[int] = (1, 5),
              query_tokens: int = QUERY_TOKENS) -> dict:
    """Held-out queries: the first `query_tokens` tokens of each val piece whose document has train passages;
    recall@k is the share whose k best passages hold one of that document."""
    docs = index.documents()
    queries = [(doc, tokenizer.decode(tokenizer.encode(text)[:query_tokens])) for doc, text in val if doc in docs]
    if not queries:
        return {"queries": 0, **{f"recall@{k}": None for k in ks}}
    hits = {k: 0 for k in ks}
    reciprocal = 0.0
    for doc, query in queries:
        ranked = [p.document for p in index.search(query, max(ks))]
        for k in ks:
            hits[k] += doc in ranked[:k]
        reciprocal += 1 / (ranked.index(doc) + 1) if doc in ranked else 0.0
    return {"queries": len(queries), **{f"recall@{k}": hits[k] / len(queries) for k in ks},
            f"mrr@{max(ks)}": reciprocal / len(queries)}


def evaluate(model: nn.Module, tokenizer: Tokenizer, index: Index, val: Sequence[tuple[str, str]],
             opts: RagOptions = RagOptions(), stride: int = 32, seq_len: int | None = None,
             batch_size: int = 16, seed: int = 0, modes: Sequence[str] = MODES) -> dict:
    """The four figures: val bits per byte without retrieval and with it from every passage (`all`), from all
    but the val text's own document (`filtered`), and with a random passage as long (`random`), each paired
    with `none` over the same pieces (difference = none - mode: above 0, the mode predicts better), with its
    standard error; and recall@k on held-out queries. `modes` (with `none`) limits the work to some of them."""
    check_options(opts)
    if not val:
        raise UserError("the val split is empty: no pieces to measure retrieval on; prepare with --val-fraction > 0")
    seq_len = seq_len or model.config.max_seq_len
    if not 1 <= stride < seq_len:
        raise UserError(f"--stride {stride} must be in [1, {seq_len}) (the window is {seq_len} tokens)")
    modes = ["none", *(m for m in MODES[1:] if m in modes)]
    segs = segments(tokenizer, index, val, seq_len, stride, opts, seed, modes)
    sums = {m: segment_sums(model, tokenizer, segs[m], len(val), batch_size) for m in modes}
    none_nats, nbytes = sums["none"]
    keep = nbytes > 0
    result = {"pieces": int(keep.sum()), "val_bytes": int(nbytes.sum()), "seq_len": seq_len, "stride": stride,
              "k": opts.k, "query_tokens": opts.query_tokens, "val_bpb": float(none_nats.sum() / LN2 / nbytes.sum())}
    for mode in modes[1:]:
        c = paired(sums[mode][0][keep], none_nats[keep], nbytes[keep])
        result[mode] = {"val_bpb": c.challenger_val_bpb, "difference": c.difference, "standard_error": c.standard_error,
                        "relative": c.difference / c.champion_val_bpb if c.champion_val_bpb else math.nan}
    result["recall"] = recall_at(index, tokenizer, val, (1, max(5, opts.k)), opts.query_tokens)
    return result


def summary_lines(r: dict) -> list[str]:
    """The four figures, one line each."""
    lines = [f"val bits/byte without retrieval: {r['val_bpb']:.4f} ({r['pieces']} val pieces, {r['val_bytes']:,} bytes; "
             f"window {r['seq_len']}, {r['stride']} targets per retrieval, top-{r['k']})"]
    names = {"all": "retrieval from every passage", "filtered": "retrieval, own document excluded",
             "random": "a random passage as long"}
    for mode, name in names.items():
        if mode not in r:
            continue
        m = r[mode]
        lines.append(f"{name:<34} {m['val_bpb']:.4f}  difference {m['difference']:+.4f} ± {m['standard_error']:.4f} "
                     f"(1 s.e.; above 0 = lower bits/byte)")
    rec = r["recall"]
    lines.append("recall on held-out queries: " + ", ".join(
        f"{k} {v:.3f}" for k, v in rec.items() if k != "queries" and v is not None) + f" ({rec['queries']} queries)")
    return lines

"""`gptmini index DATA_DIR`: the retrieval index of a prepared folder's train passages (docs/rag.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from gptmini.cli import run
from gptmini.retrieval import PASSAGE_CHARS, BuildResult, build_index


def index_summary(res: BuildResult, data_dir: Path) -> str:
    e = res.entry
    if res.up_to_date:
        return f"{data_dir}/{e['file']} is up to date ({e['passages']:,} passages); nothing to do"
    return (f"wrote {data_dir}/{e['file']}: {e['passages']:,} train passages of at most {e['passage_chars']} "
            f"characters from {e['inputs']} input(s), {e['bytes'] / 2**20:.1f} MB ({e['retriever']}); read "
            f"{res.added_inputs} input(s), removed {res.removed_inputs}, the rest kept from the earlier index, "
            f"in {res.seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gptmini index", description="Build or update the BM25 retrieval index of "
                                "a prepared folder's train passages; its sha256 goes into the manifest.")
    p.add_argument("data_dir", type=Path, help="a `gptmini prepare` folder")
    p.add_argument("--passage-chars", type=int, default=PASSAGE_CHARS,
                   help="most characters per passage (about 4 per cl100k token)")
    p.add_argument("--from", dest="base", type=Path, help="an earlier prepared folder or index file to update")
    p.add_argument("--text-field", default="text", help="as given to `gptmini prepare`")
    p.add_argument("--force", action="store_true", help="build anew, reusing no earlier index")
    a = p.parse_args(argv)
    return run("gptmini index", lambda: print(index_summary(
        build_index(a.data_dir, a.passage_chars, a.force, a.base, a.text_field), a.data_dir)))

"""The documents a user reads: every relative link in README.md, BENCHMARKS.md and docs/*.md leads to a file
that exists and, where it names a heading (`page.md#heading`), to a heading that exists (GitHub's anchors)."""

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks, where a `#` line is a heading and `[x](y)` a link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> Iterator[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", prose(path.read_text()), flags=re.M):
        slug = anchor(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        yield slug if n == 0 else f"{slug}-{n}"


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def test_anchor_follows_github():
    assert anchor("Serving: `gptmini serve`, following `@production`") == "serving-gptmini-serve-following-production"
    assert anchor("llama.cpp / GGUF") == "llamacpp--gguf"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in relative_links(document):
        file, _, heading = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif heading and path.suffix == ".md" and heading not in set(anchors(path)):
            broken.append(f"{target}: no heading #{heading} in {path.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_describe_the_project_not_its_making(document):
    """Users read these: no tracker numbers or working diary (history lives in git and docs/benchmarks-log.md)."""
    text = document.read_text()
    found = re.findall(r"\bissue \d+|\(issue|this session|until today", text, flags=re.I)
    assert not found, f"{document.relative_to(ROOT)} mentions {sorted(set(found))}"


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "generate", "export-hf", "promote", "launch slurm",
                                     "serve"])
def test_every_command_shows_its_options(command, capsys):
    """The README's promise: `gptmini <command> --help` lists every option, and exits 0."""
    from gptmini.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    assert f"usage: gptmini {command}" in capsys.readouterr().out

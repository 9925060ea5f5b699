"""The library's shape (docs/ARCHITECTURE.md): imports point one way, checked by import-linter's contracts
in pyproject.toml, and no import hides inside a function to dodge a cycle."""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "gptmini"


def imports(path: Path, nested_only: bool = False) -> list[str]:
    """The modules `path` imports (at any depth, or only inside functions)."""
    tree = ast.parse(path.read_text())
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] if nested_only \
        else [tree]
    found = []
    for scope in scopes:
        for node in ast.walk(scope):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append(node.module)
    return found


def test_import_contracts_are_kept():
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_model_imports_only_torch():
    found = imports(LIBRARY / "model.py")
    assert all(m.split(".")[0] in ("__future__", "dataclasses", "math", "torch") for m in found), found
    assert not [m for m in found if m.startswith("torch.distributed")]


def test_no_module_of_ours_is_imported_inside_a_function():
    """A lazy import of our own module is how a cycle hides; optional or heavy third-party packages
    (MLflow, matplotlib, pyarrow) may be imported where they are used."""
    lazy = {str(p.relative_to(ROOT)): [m for m in imports(p, nested_only=True) if m.split(".")[0] == "gptmini"]
            for p in LIBRARY.rglob("*.py")}
    # The one exception: `gptmini.checkpoint.load_model`, the loader's documented old name, pinned in test_api.
    assert {p: m for p, m in lazy.items() if m} == {"gptmini/checkpoint.py": ["gptmini.weights"]}


def test_the_library_has_no_argparse_outside_the_cli():
    users = [str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py")
             if "argparse" in imports(p) and p.parent.name != "cli"]
    assert users == []


def table_rows(doc: Path, heading: str) -> list[list[str]]:
    """The cells of the markdown table under `heading` (a `\\|` inside a cell is not a separator)."""
    section = doc.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]  # past the header and its rule
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def source_file(name: str) -> Path:
    return ROOT / name if name.startswith(("flows/", "bench/", "tests/")) else LIBRARY / name


def module_name(path: Path) -> str:
    """How others import it: gptmini.data.prepare, flows.tasks; a bench/ script by its stem (bench/ is on the path)."""
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.name if rel.parts[0] == "bench" else ".".join(rel.parts)


@functools.lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def defines(path: Path, dotted: str) -> bool:
    """Whether `path` defines NAME at module level (or CLASS.NAME in a class), read without importing it."""
    scope: list[ast.stmt] = parsed(path).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            targets = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
            if getattr(node, "name", None) == part or part in targets:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def imported_by(path: Path) -> set[str]:
    """The modules `path` imports, `from gptmini import files` counted as gptmini.files."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_each_home_in_the_architecture_table_defines_its_names_and_its_users_import_it():
    """docs/ARCHITECTURE.md's "One home per concept": the first `file.py` of a home cell is the home, the other
    code names in it (outside parentheses, which explain) are defined there, and each `file.py` of the last
    cell imports the home."""
    rows = table_rows(ROOT / "docs" / "ARCHITECTURE.md", "## One home per concept")
    assert len(rows) > 30
    wrong = []
    for concept, home_cell, users_cell in rows:
        while (plain := re.sub(r"\([^()]*\)", "", home_cell)) != home_cell:
            home_cell = plain
        home, *names = re.findall(r"`([A-Za-z_][\w./]*)`", home_cell)
        path = source_file(home)
        if not home.endswith(".py") or not path.is_file():
            wrong.append(f"{concept}: home {home!r} is not a file")
            continue
        wrong += [f"{concept}: {home} defines no {name}" for name in names
                  if not name.endswith(".py") and not defines(path, name)]
        for user in re.findall(r"`([\w/]+\.py)`", users_cell):
            imports = imported_by(source_file(user))
            module = module_name(path)
            if not any(m == module or m.startswith(module + ".") for m in imports):
                wrong.append(f"{concept}: {user} does not import {module}")
    assert wrong == []

"""The library's shape (docs/ARCHITECTURE.md): imports point one way, checked by import-linter's contracts
in pyproject.toml, and no import hides inside a function to dodge a cycle."""
from __future__ import annotations

import ast
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
    assert {p: m for p, m in lazy.items() if m} == {}


def test_the_library_has_no_argparse_outside_the_cli():
    users = [str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py")
             if "argparse" in imports(p) and p.parent.name != "cli"]
    assert users == []

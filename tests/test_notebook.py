"""notebooks/tutorial.ipynb: kept without outputs in git, and executed top to bottom on a real Jupyter kernel
(nbclient + ipykernel) with the tiny preset, where any cell that raises fails the test."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "notebooks" / "tutorial.ipynb"


def test_the_tutorial_is_kept_without_outputs():
    nb = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        "clear the outputs before committing (Jupyter: Edit > Clear Outputs of All Cells)"


@pytest.mark.slow
def test_the_tutorial_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTMINI_TUTORIAL_FAST", "1")
    for name, folder in (("GPTMINI_CACHE_DIR", "cache"), ("JUPYTER_RUNTIME_DIR", "jupyter"), ("IPYTHONDIR", "ipython")):
        monkeypatch.setenv(name, str(tmp_path / folder))  # nothing written to the developer's home
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread beats two on a shared 2-core machine
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)  # no stack: the registry cell must skip itself cleanly
    nb = nbformat.read(TUTORIAL, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {i: "".join(o.get("text", "") for o in cell.outputs) for i, cell in enumerate(nb.cells)
               if cell.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "M parameters" in text and "greedy:" in text and "skipped" in text
    # The training cell drew the live curves (an image updated in place) and tqdm's notebook bar (a widget).
    training = next(cell for cell in nb.cells if cell.cell_type == "code" and "trainer.train(" in cell.source)
    kinds = {key for o in training.outputs for key in o.get("data", {})}
    assert "image/png" in kinds and "application/vnd.jupyter.widget-view+json" in kinds, kinds

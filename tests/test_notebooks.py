"""Every notebook in notebooks/ runs top to bottom (nbclient, python3 kernel) on a small MedQuAD sample."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require

nbformat = require("nbformat")
nbclient = require("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_calibration_study.ipynb",
                                           "03_your_own_collection.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:  # notebooks are committed without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has saved outputs"
    monkeypatch.setenv("MEDQUANT_NB_LIMIT", "20")  # inherited by the kernel process
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

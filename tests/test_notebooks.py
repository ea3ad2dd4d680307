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
                                           "03_your_own_collection.ipynb", "04_recover_with_finetuning.ipynb",
                                           "05_autoquantize.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    book = nbformat.read(path, as_version=4)
    for cell in book.cells:  # notebooks are committed without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has saved outputs"
    monkeypatch.setenv("MEDQUANT_NB_LIMIT", "20")  # inherited by the kernel process
    monkeypatch.setenv("MEDQUANT_NB_MAX_LENGTH", "32")  # a quarter of the notebooks' 128 tokens: every cell still runs
    client = nbclient.NotebookClient(book, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError with the failing cell and traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_progress_bars_in_a_kernel_without_ipywidgets(monkeypatch):
    """tqdm.auto would fall back to a text bar refreshing every 0.1 s, each refresh one more notebook output; in a
    kernel without ipywidgets medquant's bars refresh at most every NOTEBOOK_TEXT_INTERVAL seconds. Outside a
    kernel they are tqdm's plain bars with tqdm's defaults."""
    import importlib.util
    import io
    import sys
    import types

    from tqdm.std import tqdm as text_bar

    from medquant import _progress

    plain = _progress.tqdm(range(3), file=io.StringIO())
    assert type(plain) is text_bar and plain.mininterval == 0.1 and not _progress.in_notebook_kernel()
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets"
                        else real_find_spec(name, *a))
    assert _progress.in_notebook_kernel()
    out = io.StringIO()
    bar = _progress.tqdm(range(200), file=out, desc="encode")
    assert type(bar) is text_bar and bar.mininterval == _progress.NOTEBOOK_TEXT_INTERVAL == 30.0
    assert sum(1 for _ in bar) == 200
    bar.close()
    assert out.getvalue().count("\r") <= 3  # first state, (maybe one refresh,) final state
    shell.config = {}  # terminal IPython: not a kernel
    assert not _progress.in_notebook_kernel()

"""Progress bars that suit where they are drawn.

In a Jupyter kernel with ipywidgets: tqdm's notebook widget. In a kernel without ipywidgets, ``tqdm.auto`` falls
back to a text bar whose every refresh becomes one more output in the notebook (and in a saved or CI-executed
notebook, dozens of lines per encode); there the text bar refreshes at most every ``NOTEBOOK_TEXT_INTERVAL``
seconds (so a short encode leaves its first and final state). Elsewhere (terminals, logs): tqdm's plain bar.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any

#: Seconds between refreshes of a text bar inside a notebook kernel without ipywidgets.
NOTEBOOK_TEXT_INTERVAL = 30.0


def in_notebook_kernel() -> bool:
    """Whether this process is an IPython kernel (Jupyter, nbclient), not a terminal IPython or plain Python."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # an IPython too old or half-imported: treat as no kernel
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def tqdm(iterable: Any = None, **kwargs: Any):
    """A tqdm bar over ``iterable`` (keyword arguments as :class:`tqdm.tqdm`), drawn as the module docstring says."""
    if in_notebook_kernel():
        if importlib.util.find_spec("ipywidgets") is not None:
            try:
                from tqdm.notebook import tqdm as widget_bar

                return widget_bar(iterable, **kwargs)
            except ImportError:  # ipywidgets present but unusable (tqdm: "IProgress not found")
                pass
        kwargs.setdefault("mininterval", NOTEBOOK_TEXT_INTERVAL)
    from tqdm.std import tqdm as text_bar

    return text_bar(iterable, **kwargs)


__all__ = ["NOTEBOOK_TEXT_INTERVAL", "in_notebook_kernel", "tqdm"]

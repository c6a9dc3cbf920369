"""Shared fixtures (the repository root and tests/ are importable: pyproject's pythonpath)."""

import pytest
import torch


@pytest.fixture
def stock_float64(monkeypatch):
    """Let stock singd's structured products run in float64.

    singd 0.0.5's ``lowest_precision`` (the compute dtype of two operands) rejects
    float64; patched to return the common dtype, which is what it returns for the
    dtypes it accepts. Nothing else of the oracle changes.
    """
    import importlib
    import pkgutil

    import singd.structures

    def lowest_precision(*dtypes):
        common = dtypes[0]
        for dtype in dtypes[1:]:
            common = dtype if torch.finfo(dtype).bits < torch.finfo(common).bits else common
        return common

    for info in pkgutil.iter_modules(singd.structures.__path__):
        module = importlib.import_module(f"singd.structures.{info.name}")
        if hasattr(module, "lowest_precision"):
            monkeypatch.setattr(module, "lowest_precision", lowest_precision)

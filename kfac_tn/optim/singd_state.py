"""SINGD's state as plain data: singd's per-layer layout, matrices as ``{"type", "tensors"}``.

``torch.load``'s default ``weights_only=True`` reads such a state; :func:`stock_state_dict`
turns it into stock singd's format (its matrix objects), :func:`matrix_from_state` reads
both.
"""

from __future__ import annotations

from typing import Any

from singd.structures.base import StructuredMatrix
from singd.structures.dense import DenseMatrix

from kfac_tn.optim.layer_matrices import as_blocks
from kfac_tn.optim.symmetric_sum import SymmetricSum

#: singd's state attributes that hold matrices → the private per-layer block lists
MATRIX_STATE = {"Ks": "_K_blocks", "Cs": "_C_blocks", "m_Ks": "_m_K_blocks", "m_Cs": "_m_C_blocks",
                "H_Ks": "_H_K_blocks", "H_Cs": "_H_C_blocks"}


def matrix_state(M: StructuredMatrix | SymmetricSum) -> dict[str, Any]:
    """A matrix as plain data: its type's name and its tensors."""
    if isinstance(M, SymmetricSum):
        return {"type": "SymmetricSum", "factors": list(M.factors), "dense": M.dense}
    return {"type": type(M).__name__, "tensors": dict(M.named_tensors())}


def matrix_from_state(entry: Any, structures: dict[str, type]) -> StructuredMatrix | SymmetricSum:
    """Inverse of :func:`_matrix_state`; matrix objects (singd's own format) pass through."""
    if not isinstance(entry, dict):
        return entry
    if entry.get("type") == "SymmetricSum":
        H = SymmetricSum(dense=entry["dense"])
        H.factors = list(entry["factors"])
        return H
    classes = {cls.__name__: cls for cls in structures.values()}
    if entry.get("type") not in classes:
        raise ValueError(f"State dict holds a matrix of unknown type {entry.get('type')!r}; "
                         f"known: {sorted(classes)} and 'SymmetricSum'.")
    M = classes[entry["type"]].__new__(classes[entry["type"]])
    StructuredMatrix.__init__(M)
    for name, tensor in entry["tensors"].items():
        M.register_tensor(tensor, name)
    return M



def stock_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`SINGD.state_dict` in stock singd 0.0.5's format (its matrix objects), for
    ``singd.optim.optimizer.SINGD.load_state_dict`` on the same model and arguments.

    Pending dense statistics kept as thin factors become ``DenseMatrix``. Layers with
    several blocks (grouped convolutions with ``grouped_conv="exact"``) have no stock
    equivalent: a ValueError names them.
    """
    from singd.optim.optimizer import SINGD as Stock

    out = dict(state)
    for key in MATRIX_STATE:
        layers = {}
        for name, entry in state.get(key, {}).items():
            blocks = as_blocks(entry)
            if len(blocks) != 1:
                raise ValueError(f"Layer {name!r} has {len(blocks)} blocks in {key} (a grouped convolution with "
                                 "grouped_conv='exact'); stock singd keeps one matrix per layer. Build both "
                                 "optimizers with grouped_conv='average' to move states between them.")
            M = matrix_from_state(blocks[0], Stock.SUPPORTED_STRUCTURES)
            layers[name] = DenseMatrix(M.to_dense()) if isinstance(M, SymmetricSum) else M
        out[key] = layers
    return out


def layer_state(blocks: list) -> Any:
    """A layer's matrices as plain data: one entry for one block (singd's layout), else a list."""
    entries = [matrix_state(M) for M in blocks]
    return entries[0] if len(entries) == 1 else entries

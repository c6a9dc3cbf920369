"""Evaluate a :class:`TensorNetwork` with opt_einsum, caching paths and pattern tensors.

Contraction paths are found once per (equation, operand shapes) and kept in a
bounded LRU cache (:data:`CACHE_SIZE` entries), as are the index-pattern tensors
(keyed by geometry, dtype and device).
"""

from __future__ import annotations

from functools import lru_cache

import opt_einsum
import torch
from torch import Tensor

from kfac_tn.tensor_network.geometry import ConvDim
from kfac_tn.tensor_network.index_pattern import index_pattern, mean_index_pattern
from kfac_tn.tensor_network.network import Pattern, TensorNetwork
from kfac_tn.tensor_network.simplify import simplify

CACHE_SIZE = 512


@lru_cache(maxsize=CACHE_SIZE)
def pattern_tensor(dim: ConvDim, mean: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Cached Π (``mean=False``) or Π̄ (``mean=True``) of one dimension."""
    build = mean_index_pattern if mean else index_pattern
    return build(dim, dtype=dtype, device=device)


@lru_cache(maxsize=CACHE_SIZE)
def contraction_plan(equation: str, shapes: tuple[tuple[int, ...], ...]):
    """Cached ``opt_einsum.ContractExpression`` for an equation and operand shapes."""
    return opt_einsum.contract_expression(equation, *shapes, optimize="auto")


def equation(network: TensorNetwork) -> str:
    """The einsum equation of ``network`` with one letter per index name."""
    letters: dict[str, str] = {}
    for name in [n for idx in network.indices for n in idx] + list(network.output):
        letters.setdefault(name, opt_einsum.get_symbol(len(letters)))
    inputs = ",".join("".join(letters[n] for n in idx) for idx in network.indices)
    return inputs + "->" + "".join(letters[n] for n in network.output)


def contract(network: TensorNetwork, simplified: bool = True) -> Tensor:
    """Contract ``network`` (optionally simplifying it first) and apply groups and scale."""
    if simplified:
        network = simplify(network)
    tensors = [op for op in network.operands if isinstance(op, Tensor)]
    if not tensors:
        raise ValueError("A network needs at least one tensor operand.")
    dtype, device = tensors[0].dtype, tensors[0].device
    operands = [
        pattern_tensor(op.dim, op.mean, dtype, device) if isinstance(op, Pattern) else op
        for op in network.operands
    ]
    plan = contraction_plan(equation(network), tuple(tuple(op.shape) for op in operands))
    result = plan(*operands, backend="torch")
    if network.scale != 1.0:
        result = result * network.scale
    return result.reshape(network.output_shape)

"""A tensor network: named-index operands, some of them index patterns, and an output.

Operands are either tensors or :class:`Pattern` placeholders (Π or Π̄ of one
dimension). Placeholders stay symbolic until contraction so that simplification can
remove them without ever building them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from torch import Tensor

from kfac_tn.tensor_network.geometry import ConvDim


@dataclass(frozen=True)
class Pattern:
    """Symbolic index pattern of one dimension.

    ``mean=False``: Π with indices ``(k, o, i)``, shape ``[K, O, I]``.
    ``mean=True``: Π̄ = mean_o Π with indices ``(k, i)``, shape ``[K, I]``.
    """

    dim: ConvDim
    mean: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        d = self.dim
        if self.mean:
            return (d.kernel_size, d.input_size)
        return (d.kernel_size, d.output_size, d.input_size)


Operand = Union[Tensor, Pattern]  # noqa: UP007 (a runtime alias)


@dataclass
class TensorNetwork:
    """Operands with one index name per axis, the output indices, and a post-processing.

    Attributes:
        operands: tensors or :class:`Pattern` placeholders.
        indices: per operand, the index names of its axes.
        output: index names of the contraction result.
        groups: how output axes are merged by the final reshape, e.g.
            ``(("n",), ("c", "k1"), ("o1",))``; defaults to no merging.
        scale: scalar the result is multiplied with.
    """

    operands: list[Operand]
    indices: list[tuple[str, ...]]
    output: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...] | None = None
    scale: float = 1.0
    sizes: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.indices):
            raise ValueError("Need one index tuple per operand.")
        self.sizes = {}
        for op, idx in zip(self.operands, self.indices):
            shape = tuple(op.shape)
            if len(shape) != len(idx):
                raise ValueError(f"Operand of shape {shape} got indices {idx}.")
            for name, size in zip(idx, shape):
                if self.sizes.setdefault(name, size) != size:
                    raise ValueError(
                        f"Index {name!r} has inconsistent sizes {self.sizes[name]} and {size}."
                    )
        missing = set(self.output) - set(self.sizes)
        if missing:
            raise ValueError(f"Output indices {sorted(missing)} appear in no operand.")
        if self.groups is None:
            self.groups = tuple((name,) for name in self.output)
        if tuple(n for g in self.groups for n in g) != self.output:
            raise ValueError(f"Groups {self.groups} do not list the output {self.output}.")

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of the result after merging the groups."""
        shape = []
        for group in self.groups:
            size = 1
            for name in group:
                size *= self.sizes[name]
            shape.append(size)
        return tuple(shape)

    def num_patterns(self) -> int:
        """How many index-pattern placeholders the network still holds."""
        return sum(isinstance(op, Pattern) for op in self.operands)

"""singd's public ``{layer name: matrix}`` attributes over kfac_tn's per-layer block lists.

kfac_tn keeps one list of blocks per layer (one block per group for a grouped
convolution with ``grouped_conv="exact"``). Stock singd's attributes ``Ks``, ``Cs``,
``m_Ks``, ``m_Cs``, ``H_Ks``, ``H_Cs`` map a layer name to one matrix; these views
present exactly that for every layer with one block (Linear, ungrouped convolutions,
any layer with ``grouped_conv="average"``) and the list of blocks otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any


def as_blocks(value: Any) -> list:
    """A layer's entry as a list of blocks (one matrix becomes a one-element list)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


class LayerMatrices(MutableMapping):
    """``{layer name: matrix or list of blocks}`` viewing ``{layer name: [blocks]}``."""

    def __init__(self, blocks: dict[str, list]) -> None:
        self.blocks = blocks

    def __getitem__(self, name: str) -> Any:
        blocks = self.blocks[name]
        return blocks[0] if len(blocks) == 1 else blocks

    def __setitem__(self, name: str, value: Any) -> None:
        self.blocks[name] = as_blocks(value)

    def __delitem__(self, name: str) -> None:
        del self.blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"LayerMatrices({dict(self)!r})"


class LayerMatricesAttribute:
    """Class attribute ``Ks = LayerMatricesAttribute("_K_blocks")``: reading gives a
    :class:`LayerMatrices` view of the private dict; assigning a mapping (singd's
    ``{name: matrix}`` or kfac_tn's ``{name: [blocks]}``) replaces the private dict."""

    def __init__(self, private: str) -> None:
        self.private = private

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return LayerMatrices(obj.__dict__.setdefault(self.private, {}))

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.private] = {name: as_blocks(v) for name, v in dict(value).items()}

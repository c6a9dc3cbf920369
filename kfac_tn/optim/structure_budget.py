"""Param groups that give SINGD's large factors a cheaper structure.

A dense ``K`` of dimension ``d_K`` costs ``d_G d_K (d_K + d_G)`` multiply-adds per step
(the natural gradient) and ``d_K³`` per update; one large layer (e.g. a 3136→1024 Linear
of a small CNN) can cost more than the rest of the network's step. :func:`budget_groups`
keeps SINGD's structures for every layer whose factors are at most ``max_dense_dim`` and
gives the larger factors ``large_structure`` (block-diagonal by default: ``d·30`` per
product), each such layer in a param group of its own, so the choice is explicit in
``opt.param_groups`` (its ``"layers"`` entry names the layer) and SINGD's arguments keep
stock's meaning::

    opt = kfac_tn.SINGD(model, params=budget_groups(model, max_dense_dim=1024), lr=0.1)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kfac_tn.capture import supported_layers
from kfac_tn.optim.validation import one_of, positive_int
from kfac_tn.optim.weight_blocks import block_dims

#: structures cheap enough for any dimension (memory and time linear in it)
LINEAR_COST_STRUCTURES = ("diagonal", "block30diagonal", "triltoeplitz", "triutoeplitz")


def budget_groups(
    model: nn.Module,
    max_dense_dim: int,
    structures: tuple[str, str] = ("dense", "dense"),
    large_structure: str = "block30diagonal",
    grouped_conv: str = "exact",
) -> list[dict[str, Any]]:
    """Param groups of ``model``'s trainable supported layers for :class:`kfac_tn.SINGD`.

    Args:
        max_dense_dim: the largest factor dimension (``d_K`` or ``d_C``) kept in
            ``structures``; a larger side gets ``large_structure``.
        structures: ``(K, C)`` structures of the other layers (SINGD's ``structures``).
        large_structure: one of :data:`LINEAR_COST_STRUCTURES`.
        grouped_conv: as SINGD's (it decides the factors' dimensions of grouped convolutions).

    Returns:
        The first group holds every layer within the bound (no ``structures`` key: SINGD's
        argument applies); then one group per larger layer with ``"structures"`` and
        ``"layers"`` (its name). Groups without parameters are left out.
    """
    positive_int("max_dense_dim", max_dense_dim)
    one_of("large_structure", large_structure, LINEAR_COST_STRUCTURES)
    within: list[nn.Parameter] = []
    groups: list[dict[str, Any]] = []
    for name, layer in supported_layers(model).items():
        params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        dims = block_dims(layer, grouped_conv == "average")
        if max(dims) <= max_dense_dim:
            within += params
            continue
        chosen = tuple(large_structure if d > max_dense_dim else s for d, s in zip(dims, structures))
        groups.append({"params": params, "structures": chosen, "layers": name})
    return ([{"params": within}] if within else []) + groups

"""SINGD's curvature statistics ``structure(Kᵀ A K)`` and ``structure(Cᵀ G C)`` on every
route (diagonal, blocks, rows, streamed rows, whole factor; fused and sharded) against
singd's own projection of the dense product, with A and G the dense factors (tested against
unfold and curvlinops in tests/factors)."""

import pytest
import torch
from singd.structures.blockdiagonal import (
    Block3DiagonalMatrix,
    Block30DiagonalMatrix,
    BlockDiagonalMatrixTemplate,
)
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from torch import nn

from kfac_tn.factors import grad_output_factor, input_factor
from kfac_tn.optim.factor_statistics import (
    grad_output_H,
    grad_output_statistics,
    input_H,
    input_statistics,
    sandwich_statistics,
)
from kfac_tn.optim.weight_blocks import block_dims
from kfac_tn.runtime.workspace import Workspace

STRUCTURES = [DenseMatrix, DiagonalMatrix, Block3DiagonalMatrix, Block30DiagonalMatrix]

# (layer, input shape, output shape): few rows (reduce, Linear) and many (expand over
# positions) reach both the rows and the whole-factor routes; groups make G = 2 blocks
LAYERS = [
    (lambda: nn.Linear(7, 5), (6, 7), (6, 5)),
    (lambda: nn.Linear(4, 6, bias=False), (3, 5, 4), (3, 5, 6)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (3, 4, 5, 5), (3, 6, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, bias=False), (2, 4, 4), (2, 6, 9)),
]


def _random_blocks(structure, dims: int, count: int, gen: torch.Generator) -> list:
    """``count`` random, non-symmetric matrices of ``structure`` (no identity or equal diagonal)."""
    return [structure.from_dense(torch.randn(dims, dims, generator=gen, dtype=torch.float64) + 2 * torch.eye(
        dims, dtype=torch.float64)) for _ in range(count)]


def _expected(Ms: list, F: torch.Tensor) -> list[torch.Tensor]:
    """singd's projection of ``Mᵀ F M`` per block, from dense matrices; ``M F Mᵀ`` for
    block-diagonal M, whose blocks singd 0.0.5 takes as symmetric (stock's convention)."""
    out = []
    for M, f in zip(Ms, F):
        dense = M.to_dense()
        product = dense @ f @ dense.T if isinstance(M, BlockDiagonalMatrixTemplate) else dense.T @ f @ dense
        out.append(type(M).from_dense(product).to_dense())
    return out


def _check(H: list, expected: list[torch.Tensor]) -> None:
    assert len(H) == len(expected)
    for h, e in zip(H, expected, strict=True):
        torch.testing.assert_close(h.to_dense(), e)


@pytest.mark.parametrize("group_average", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.__name__)
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_input_statistics_are_the_projected_sandwich_of_the_dense_factor(case, structure, approx, group_average):
    make, x_shape, _ = LAYERS[case]
    gen = torch.Generator().manual_seed(case + 11)
    layer = make().double()
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    A = input_factor(layer, x, approx, group_average)  # [G, d, d]
    dim_K = block_dims(layer, group_average)[0]
    Ks = _random_blocks(structure, dim_K, A.shape[0], gen)
    expected = _expected(Ks, A)
    _check(input_H(layer, x, Ks, approx, group_average), expected)
    _check(input_H(layer, x, Ks, approx, group_average, workspace=Workspace()), expected)
    # sharded: statistics without K (averaged over ranks), sandwiched by the owner
    _check(sandwich_statistics(Ks, input_statistics(layer, x, structure, approx, group_average)), expected)


@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
@pytest.mark.parametrize("group_average", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.__name__)
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_grad_output_statistics_are_the_projected_sandwich_of_the_dense_factor(case, structure, approx,
                                                                               group_average, loss_average):
    make, _, g_shape = LAYERS[case]
    gen = torch.Generator().manual_seed(case + 23)
    layer = make().double()
    g = torch.randn(*g_shape, generator=gen, dtype=torch.float64)
    G = grad_output_factor(layer, g, approx, loss_average, group_average)  # [G, D, D]
    Cs = _random_blocks(structure, block_dims(layer, group_average)[1], G.shape[0], gen)
    expected = _expected(Cs, G)
    _check(grad_output_H(layer, g, Cs, approx, loss_average, group_average), expected)
    _check(grad_output_H(layer, g, Cs, approx, loss_average, group_average, workspace=Workspace()), expected)
    _check(sandwich_statistics(Cs, grad_output_statistics(layer, g, structure, approx, loss_average,
                                                          group_average)), expected)

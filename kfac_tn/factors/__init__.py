"""Kronecker factors per layer kind, built on the tensor-network engine."""

from kfac_tn.factors.grad_output_factor import (
    grad_output_factor,
    grad_output_factor_blocks,
    grad_output_factor_diagonal,
    grad_output_factor_diagonal_sum,
    grad_output_rows,
)
from kfac_tn.factors.input_factor import (
    input_factor,
    input_factor_blocks,
    input_factor_diagonal,
    input_factor_diagonal_sum,
    input_row_chunks,
    input_rows,
)
from kfac_tn.factors.layers import SUPPORTED_LAYERS
from kfac_tn.factors.subsampled import subsampled_grad_output_factor, subsampled_input_factor

__all__ = [
    "SUPPORTED_LAYERS",
    "grad_output_factor",
    "grad_output_factor_blocks",
    "grad_output_factor_diagonal",
    "grad_output_factor_diagonal_sum",
    "grad_output_rows",
    "input_factor",
    "input_factor_blocks",
    "input_factor_diagonal",
    "input_factor_diagonal_sum",
    "input_row_chunks",
    "input_rows",
    "subsampled_grad_output_factor",
    "subsampled_input_factor",
]

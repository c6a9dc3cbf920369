"""The tensor networks that define every quantity (Dangel, NeurIPS 2024): index patterns
Π, Π̄, einsum expressions of convolutions, their VJPs, unfold, KFC and KFAC-reduce,
symbolic simplification and a generic, cached contraction. They are the definition and
the tests' oracle; :mod:`kfac_tn.kernels` evaluates the factors' networks faster."""

from kfac_tn.tensor_network import expressions
from kfac_tn.tensor_network.contraction import contract, equation
from kfac_tn.tensor_network.geometry import ConvDim, conv_dims, layer_conv_dims
from kfac_tn.tensor_network.index_pattern import index_pattern, mean_index_pattern
from kfac_tn.tensor_network.network import Pattern, TensorNetwork
from kfac_tn.tensor_network.simplify import simplify

__all__ = [
    "ConvDim",
    "Pattern",
    "TensorNetwork",
    "contract",
    "conv_dims",
    "equation",
    "expressions",
    "index_pattern",
    "layer_conv_dims",
    "mean_index_pattern",
    "simplify",
]

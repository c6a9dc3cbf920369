"""Hooks that capture layer inputs and output gradients, and which layers they watch."""

from kfac_tn.capture.hooks import LayerCapture
from kfac_tn.capture.layers import supported_layers, supported_parameters, unsupported_layers

__all__ = ["LayerCapture", "supported_layers", "supported_parameters", "unsupported_layers"]

"""Hooks that capture layer inputs and output gradients."""

from kfac_tn.capture.hooks import LayerCapture

__all__ = ["LayerCapture"]

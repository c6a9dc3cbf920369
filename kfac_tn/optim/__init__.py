"""Optimizers on top of the tensor-network factors."""

from kfac_tn.optim.kfac import KFAC
from kfac_tn.optim.singd import SINGD

__all__ = ["KFAC", "SINGD"]

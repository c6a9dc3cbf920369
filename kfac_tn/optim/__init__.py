"""Optimizers on top of the tensor-network factors."""

from kfac_tn.optim.kfac import KFAC
from kfac_tn.optim.singd import SINGD
from kfac_tn.optim.structure_budget import budget_groups

__all__ = ["KFAC", "SINGD", "budget_groups"]

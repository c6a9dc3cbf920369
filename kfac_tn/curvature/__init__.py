"""Model-level curvature analysis on top of the factors."""

from kfac_tn.curvature.kfac_factors import kfac_factors

__all__ = ["kfac_factors"]

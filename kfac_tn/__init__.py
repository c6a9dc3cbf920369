"""kfac_tn: KFAC and SINGD for CNNs with tensor-network Kronecker factors."""

from importlib.metadata import PackageNotFoundError, version

from kfac_tn.curvature import kfac_factors
from kfac_tn.factors import SUPPORTED_LAYERS, grad_output_factor, input_factor
from kfac_tn.optim import KFAC, SINGD, budget_groups
from kfac_tn.runtime.routes import use_routes

__all__ = ["KFAC", "SINGD", "SUPPORTED_LAYERS", "budget_groups", "grad_output_factor", "input_factor", "kfac_factors",
           "use_routes"]
try:
    __version__ = version("kfac_tn")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

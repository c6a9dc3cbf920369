"""kfac_tn: KFAC and SINGD for CNNs with tensor-network Kronecker factors."""

from kfac_tn.curvature import kfac_factors
from kfac_tn.factors import SUPPORTED_LAYERS, grad_output_factor, input_factor
from kfac_tn.optim import KFAC, SINGD
from kfac_tn.tensor_network.routes import use_routes

__all__ = ["KFAC", "SINGD", "SUPPORTED_LAYERS", "grad_output_factor", "input_factor", "kfac_factors", "use_routes"]
__version__ = "0.1.0"

"""Exact evaluations of the tensor networks of :mod:`kfac_tn.tensor_network` in chosen
contraction orders (shift Grams, chunked unfold + GEMM, diagonal blocks only, the
averaged input), faster than a generic contraction where it matters; each names the
network it evaluates."""

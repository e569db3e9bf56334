"""Triton kernels for bitfast (installed as bitfast.kernels). One op per file."""

"""Triton kernels of saep-kernels (installed as ``saep_kernels.triton_kernels``)."""

from .dwconv_pool import dwconv_pool_bwd, dwconv_pool_fwd, interpreting

__all__ = ["dwconv_pool_fwd", "dwconv_pool_bwd", "interpreting"]

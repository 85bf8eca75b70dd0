"""Triton kernels of saep-kernels (installed as ``saep_kernels.triton_kernels``): one module
per direction, ``fused_aggregate_fwd`` and ``fused_aggregate_bwd`` (each a kernel and its
launcher of the same name), and what they share in ``shared``."""

"""saep-kernels: fused GPU/CPU kernels for the SAEP vision-language projector.

    >>> import saep_kernels
    >>> y = saep_kernels.fused_aggregate(layers, weight, bias, num_prefix_tokens=1)
    >>> proj = saep_kernels.SAEPProjector(vision_dim=1024, num_layers=4, llm_dim=4096)
"""

from .backends import BACKENDS, BackendUnavailable, available_backends
from .backends.extension import cpu_capabilities, cpu_capability, set_cpu_capability
from .modules import SAEPProjector
from .ops import FusedAggregateFunction, aggregate_spec, fused_aggregate
from .reference import fused_aggregate_reference
from .spec import AggregateSpec, num_output_tokens
from .varlen import fused_aggregate_varlen

__version__ = "0.1.0"

__all__ = [
    "AggregateSpec",
    "BACKENDS",
    "BackendUnavailable",
    "FusedAggregateFunction",
    "SAEPProjector",
    "aggregate_spec",
    "available_backends",
    "cpu_capabilities",
    "cpu_capability",
    "fused_aggregate",
    "fused_aggregate_reference",
    "fused_aggregate_varlen",
    "num_output_tokens",
    "set_cpu_capability",
    "__version__",
]

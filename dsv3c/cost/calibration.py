"""The calibration layer's interface: kernel and link times and their constants, in one import.

    from dsv3c.cost import calibration as cal
    cal.gemm_seconds(m, n, k, groups=g, layout="contiguous", gpu=gpu, sms=sms, c=constants)

Kernel times (`kernels.py`: GEMMs, attention, MLA decode, memory-bound kernels, launch gaps) and link times
(`links.py`: DeepEP normal and low-latency dispatch/combine, NCCL sends and rings) are calibrated on the
published measurements of `measurements.py`; their constants, with source and range, are
`calibration_constants.CONSTANTS`. `bench/fidelity.py` shows how well each reproduces its measurements.
"""

from dsv3c.cost.calibration_constants import (BOUNDS, CONSTANTS, SOURCE_KINDS, bound_values, calibration_note,
                                              default_values)
from dsv3c.cost.kernels import attention_seconds, gemm_seconds, launch_seconds, mla_decode_seconds, memory_seconds
from dsv3c.cost.links import (all_gather_seconds, ep_low_latency_seconds, ep_normal_seconds, p2p_seconds,
                              reduce_scatter_seconds)

__all__ = [
    "BOUNDS", "CONSTANTS", "SOURCE_KINDS", "all_gather_seconds", "attention_seconds", "bound_values",
    "calibration_note", "default_values", "ep_low_latency_seconds", "ep_normal_seconds", "gemm_seconds",
    "launch_seconds", "memory_seconds", "mla_decode_seconds", "p2p_seconds", "reduce_scatter_seconds",
]

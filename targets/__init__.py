"""What dsv3c compiles for: GPU specs, cluster topology and named targets (costs live in dsv3c.cost; the kernel
families of dsv3c.codegen hold their own tile tables)."""

from .errors import TargetError
from .gpus import GPUS, MODES, GPUSpec, as_gpu_spec, compute_sms, gpu_spec
from .named import (DESCRIBE_HEADERS, NAMED_TARGETS, Target, describe_targets, get_target, list_targets,
                    load_target_file)
from .topology import Route, Topology, build_topology

__all__ = [
    "DESCRIBE_HEADERS", "GPUS", "GPUSpec", "NAMED_TARGETS", "Route", "Target", "TargetError",
    "Topology", "MODES", "as_gpu_spec", "build_topology", "compute_sms", "describe_targets",
    "get_target", "gpu_spec", "list_targets", "load_target_file",
]

"""What dsv3c compiles for: GPU specs, cluster topology, named targets and tile tables (costs live in dsv3c.cost)."""

from .errors import TargetError
from .gpus import GPUS, MODES, GPUSpec, as_gpu_spec, compute_sms, gpu_spec
from .named import (DESCRIBE_HEADERS, NAMED_TARGETS, Target, describe_targets, get_target, list_targets,
                    load_target_file)
from .tiles import FAMILIES, grid_sms, shared_bytes, tile_config
from .topology import Route, Topology, build_topology

__all__ = [
    "DESCRIBE_HEADERS", "FAMILIES", "GPUS", "GPUSpec", "NAMED_TARGETS", "Route", "Target", "TargetError",
    "Topology", "MODES", "as_gpu_spec", "build_topology", "compute_sms", "describe_targets",
    "get_target", "gpu_spec", "grid_sms", "list_targets", "load_target_file", "shared_bytes", "tile_config",
]

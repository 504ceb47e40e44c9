"""What dsv3c compiles for: GPU specs, cluster topology, named targets, cost model and tile tables."""

from .cost_model import all_to_all_seconds, compute_sms, gemm_cost, matmul_seconds, transfer_seconds
from .errors import TargetError
from .gpus import GPUS, GPUSpec, gpu_spec
from .named import (DESCRIBE_HEADERS, NAMED_TARGETS, Target, describe_targets, get_target, list_targets,
                    load_target_file)
from .tiles import FAMILIES, grid_sms, shared_bytes, tile_config
from .topology import Route, Topology, build_topology

__all__ = [
    "DESCRIBE_HEADERS", "FAMILIES", "GPUS", "GPUSpec", "NAMED_TARGETS", "Route", "Target", "TargetError",
    "Topology", "all_to_all_seconds", "build_topology", "compute_sms", "describe_targets", "gemm_cost",
    "get_target", "gpu_spec", "grid_sms", "list_targets", "load_target_file", "matmul_seconds",
    "shared_bytes", "tile_config", "transfer_seconds",
]

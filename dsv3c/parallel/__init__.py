"""The parallel plan: one ParallelPlan per compile (degrees, rank map, schedule, stages, expert placement, unit)."""

from dsv3c.parallel.build import ParallelError, Planned, moe_layer_names, plan_parallel
from dsv3c.parallel.plan import InferenceUnit, ParallelPlan, from_dict

__all__ = ["InferenceUnit", "ParallelError", "ParallelPlan", "Planned", "from_dict", "moe_layer_names",
           "plan_parallel"]

"""The compile's state: the program plus typed analyses, threaded through the pass manager.

A pass reads and writes the Plan: it rewrites `plan.program` and fills the analyses it declares in its
registry entry (`writes`); the pass manager checks that what a pass `reads` was written before it runs.
The mode is the program's (stored once); the target is required.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from dsv3c.ir.program import Program


@dataclass
class Analyses:
    """Facts about the plan that passes compute; None until a pass writes them."""

    costs: dict | None = None  # cost: per-node costs summed per layer and in total
    mla: dict | None = None  # mla_fuse: the attention form chosen and the costs it compared
    recompute: dict | None = None  # mla_fuse: nodes recomputed in backward, by kind
    precision_policy: dict | None = None  # fp8_quant: the dtype of each GEMM component
    kernels: list | None = None  # lower_triton: the kernel specialisations and their compiled files
    call_specs: list | None = None  # lower_triton: the kernel-call specialisations the graph uses
    parallel: Any = None  # the ParallelPlan (degrees, rank map, schedule, stages, placement); the driver writes it
    placement: Any = None  # expert_partition: per MoE layer, slots, redundant experts, node bound and fan-out
    schedule: Any = None  # pipeline_partition: the stages' blocks, the schedule's actions and peak activations

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every analysis name."""
        return tuple(f.name for f in fields(cls))

    def available(self) -> set[str]:
        """Names of the analyses computed so far."""
        return {name for name in self.names() if getattr(self, name) is not None}


class PlanError(ValueError):
    """A plan built from inconsistent parts."""


@dataclass
class Plan:
    """The program being compiled, for which target, with what passes found out about it."""

    program: Program
    target: Any  # targets.Target
    analyses: Analyses = field(default_factory=Analyses)
    options: dict = field(default_factory=dict)  # compile-wide settings: output dir, precision, cost constants

    def __post_init__(self):
        if self.target is None:
            raise PlanError("a plan needs a target (e.g. targets.get_target('h800x8'))")
        if self.analyses.parallel is None:  # until the compile's layout is set: one GPU
            from dsv3c.parallel.plan import single_gpu

            self.analyses.parallel = single_gpu(self.program.cfg, self.program.mode)

    @property
    def mode(self) -> str:
        """train, prefill or decode: the mode the program was captured for."""
        return self.program.mode

    @property
    def cfg(self):
        """The model config."""
        return self.program.cfg

    @property
    def shapes(self) -> dict:
        """The captured batch, seq and kv_len."""
        return self.program.shapes

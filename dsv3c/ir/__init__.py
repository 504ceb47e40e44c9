"""The IR: the captured program (a torch.export graph with lifted weights) and the compile's Plan."""

from dsv3c.ir.plan import Analyses, Plan, PlanError
from dsv3c.ir.program import Program, layer_of, module_path

__all__ = ["Analyses", "Plan", "PlanError", "Program", "layer_of", "module_path"]

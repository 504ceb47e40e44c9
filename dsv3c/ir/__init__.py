"""The IR: the captured program (a torch.export graph with lifted weights) and the compile's Plan."""

from dsv3c.ir.program import PassContext, Program, layer_of, module_path

__all__ = ["PassContext", "Program", "layer_of", "module_path"]

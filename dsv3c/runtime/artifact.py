"""A lowered program as an artifact: another process loads and runs it without lowering again.

`<out>/program/` holds `program.py` (the graph's Python code, calling ATen ops and `dsv3.kernel_call`),
`program.json` (inputs, outputs, weight names with shapes and dtypes, mode, and every kernel-call
specialisation with its Triton kernel specs) and, when the weights are real, `weights.safetensors`.
Loading registers the specialisations, so each `kernel_call` launches exactly the kernels lowering chose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dsv3c.codegen.lowering import CallSpec, register_specs

PROGRAM_DIR = "program"
FORMAT = 1


class ArtifactError(ValueError):
    """A program directory that cannot be loaded."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_program(program, call_specs, directory: Path, with_weights: bool = False) -> dict:
    """Write the lowered program to directory; returns its plan.json entry."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "program.py").write_text(program.gm.code)
    meta = {
        "format": FORMAT,
        "mode": program.mode,
        "placeholders": [n.name for n in program.placeholders()],
        "inputs": program.inputs,
        "outputs": program.outputs,
        "weights": {name: [list(w.shape), _dtype_name(w.dtype)] for name, w in sorted(program.weights.items())},
        "call_specs": [s.to_json() for s in sorted(call_specs, key=lambda s: s.id)],
    }
    (directory / "program.json").write_text(json.dumps(meta, indent=1) + "\n")
    if with_weights:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in program.weights.items()}, str(directory / "weights.safetensors"))
    return {"dir": directory.name, "call_specs": len(meta["call_specs"]), "weights": len(meta["weights"])}


class LoadedProgram:
    """A program loaded from its artifact: call it with the user inputs, get the outputs by name."""

    def __init__(self, directory: Path, weights: dict[str, torch.Tensor] | None = None):
        directory = Path(directory)
        try:
            self.meta = json.loads((directory / "program.json").read_text())
            code = (directory / "program.py").read_text()
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read lowered program in {directory}: {e}") from None
        if self.meta.get("format") != FORMAT:
            raise ArtifactError(f"{directory}: program format {self.meta.get('format')} is not {FORMAT}")
        register_specs(CallSpec.from_json(d) for d in self.meta["call_specs"])
        namespace = {"torch": torch, "inf": math.inf, "nan": math.nan, "device": torch.device}
        exec(compile(code, str(directory / "program.py"), "exec"), namespace)  # the graph's own generated code
        self._forward = namespace["forward"]
        self.weights = weights if weights is not None else self._load_weights(directory)
        self.inputs, self.outputs = self.meta["inputs"], self.meta["outputs"]

    def _load_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The weights stored beside the program."""
        path = directory / "weights.safetensors"
        if not path.exists():
            raise ArtifactError(f"{directory} holds no weights; pass them to LoadedProgram")
        from safetensors.torch import load_file

        return load_file(str(path))

    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the program on user inputs (in `inputs` order); returns outputs by name."""
        given = dict(zip(self.inputs, args, strict=True))
        call = [self.weights[n] if n in self.weights else given[n] for n in self.meta["placeholders"]]
        return dict(zip(self.outputs, self._forward(None, *call), strict=True))

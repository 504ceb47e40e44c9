"""A lowered program as an artifact: another process loads and runs it without lowering again.

`<out>/program/` holds `program.py` (one function per segment of the graph, `dsv3c.ir.segments`: Python code
calling ATen ops and `dsv3.kernel_call`; a program of blocks has one per distinct block), `program.json`
(the model's inputs, outputs, weight names with shapes and dtypes, mode, every kernel-call specialisation
with its Triton kernel specs, and the run plan: each segment call with its instance's arguments and the
values it reads and writes) and, when the weights are real, `weights.safetensors` (every instance's).
Loading registers the specialisations, so each `kernel_call` launches exactly the kernels lowering chose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from dsv3c.codegen.lowering import CallSpec, register_specs
from dsv3c.ir.segments import plan, segments

PROGRAM_DIR = "program"
FORMAT = 2


class ArtifactError(ValueError):
    """A program directory that cannot be loaded."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_program(program, call_specs, directory: Path, with_weights: bool = False) -> dict:
    """Write the lowered program to directory; returns its plan.json entry."""
    directory.mkdir(parents=True, exist_ok=True)
    segs = segments(program)
    steps, outputs, _ = plan(program, segs)
    code = "".join(seg.gm.code.replace("def forward(", f"def segment_{k}(", 1) for k, seg in enumerate(segs))
    (directory / "program.py").write_text(code)
    weights = program.model_weights()
    meta = {
        "format": FORMAT,
        "mode": program.mode,
        "inputs": program.model_inputs,
        "outputs": [[name, outputs[name]] for name in program.model_outputs],
        "weights": {name: [list(program.weights[w].shape), _dtype_name(program.weights[w].dtype)]
                    for name, (_, w) in sorted(weights.items())},
        "call_specs": [s.to_json() for s in sorted(call_specs, key=lambda s: s.id)],
        "steps": [{"segment": t.segment, "params": t.params, "args": t.args, "outs": t.outs} for t in steps],
    }
    (directory / "program.json").write_text(json.dumps(meta, indent=1) + "\n")
    if with_weights:
        from safetensors.torch import save_file

        memo: dict = {}
        values = {name: program.weights[w] if inst is None else program.blocks.weight(program, inst, w, memo)
                  for name, (inst, w) in weights.items()}
        save_file({k: v.contiguous() for k, v in values.items()}, str(directory / "weights.safetensors"))
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
        self._segments = {k: namespace[f"segment_{k}"] for k in {step["segment"] for step in self.meta["steps"]}}
        self.weights = weights if weights is not None else self._load_weights(directory)
        self.inputs = self.meta["inputs"]
        self.outputs = [name for name, _ in self.meta["outputs"]]

    def _load_weights(self, directory: Path) -> dict[str, torch.Tensor]:
        """The weights stored beside the program."""
        path = directory / "weights.safetensors"
        if not path.exists():
            raise ArtifactError(f"{directory} holds no weights; pass them to LoadedProgram")
        from safetensors.torch import load_file

        return load_file(str(path))

    def __call__(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the program on user inputs (in `inputs` order): its segments as the run plan says; outputs by name."""
        env = {**self.weights, **dict(zip(self.inputs, args, strict=True))}
        for step in self.meta["steps"]:
            outs = self._segments[step["segment"]](None, *step["params"], *(env[a] for a in step["args"]))
            env.update(zip(step["outs"], outs, strict=True))
        return {name: env[value] for name, value in self.meta["outputs"]}

"""Pass dumps, after MLIR's pass instrumentation: graph, stats and diff per pass, MLIR of one layer.

A program of blocks prints each distinct block once; its text starts with one `# block B computes U, ...`
line per block, which `dsv3c inspect --layer N` reads to show the block that computes layer N.
"""

import difflib
import json
import re
from pathlib import Path

import torch
from torch import fx

from dsv3c.ir import Program, layer_of
from dsv3c.ir.segments import subgraph

_BLOCK_LINE = re.compile(r"^# block (\S+) computes (.+)$", flags=re.M)


def graph_text(program: Program) -> str:
    """The readable graph (print_readable), each node's line tagged with the block it belongs to; a program of
    blocks first lists the units of the model each block computes."""
    text = program.gm.print_readable(print_output=False, include_stride=False, include_device=False)
    layers = {n.name: layer_of(n) for n in program.graph.nodes}
    out = []
    if program.blocks is not None:
        for block in dict.fromkeys(i.block for i in program.blocks.instances):
            out.append(f"# block {block} computes {', '.join(i.unit for i in program.blocks.of(block))}")
    for line in text.splitlines():
        name = line.strip().split(":", 1)[0].split(" ", 1)[0]
        layer = layers.get(name)
        out.append(f"{line}  # {layer}" if layer and " = " in line else line)
    return "\n".join(out) + "\n"


def computed_by(text: str) -> dict[str, str]:
    """unit -> the block whose lines compute it, from a graph text's `# block` lines (none for a whole graph)."""
    return {unit: block for block, units in _BLOCK_LINE.findall(text) for unit in units.split(", ")}


def layer_lines(text: str, layer: str) -> list[str]:
    """The lines of a graph text that compute one block ('layers.5'): its own, or those of the block computing it."""
    block = computed_by(text).get(layer, layer)
    return [line for line in text.splitlines() if line.endswith(f"# {block}")]


def unified_diff(a: str, b: str, a_name: str, b_name: str) -> str:
    """A unified diff between two graph texts."""
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), a_name, b_name, n=1))


class Dumper:
    """Writes NN_<pass>.{graph.txt,stats.json,diff[,mlir]} and pipeline.txt into a directory."""

    def __init__(self, directory, mlir_layer: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mlir_layer = mlir_layer
        self.written: list[str] = []  # file names, for the directory's manifest (dsv3c.outdir)

    def _write(self, name: str, text: str) -> Path:
        """Write one dump file and remember its name."""
        path = self.dir / name
        path.write_text(text)
        self.written.append(name)
        return path

    def write_pipeline(self, pipeline: str, options: dict) -> None:
        """pipeline.txt: the pipeline string with pass options (replayable with --passes) and the run's settings."""
        lines = [pipeline] + [f"{k}={v}" for k, v in sorted(options.items())]
        self._write("pipeline.txt", "\n".join(lines) + "\n")

    def write_pass(self, index: int, name: str, program: Program, text: str, prev: str | None, record) -> None:
        """The dumps of one pass: graph text, stats, diff against the previous graph, MLIR of a layer."""
        stem = f"{index:02d}_{name}"
        self._write(f"{stem}.graph.txt", text)
        self._write(f"{stem}.stats.json", json.dumps(record.to_dict(), indent=1, sort_keys=True) + "\n")
        self._write(f"{stem}.diff", unified_diff(prev or "", text, "before", stem))
        if self.mlir_layer is not None:
            layer = f"layers.{self.mlir_layer}"
            block = next((i.block for i in program.blocks.instances if i.unit == layer), layer) if program.blocks else layer
            self._write(f"{stem}.mlir", layer_mlir(program, block))

    def write_failure(self, index: int, name: str, text: str, repro: str) -> Path:
        """The input graph of a failed pass and the command that reproduces the failure."""
        return self._write(f"{index:02d}_{name}.FAILED.input.graph.txt", f"# reproduce with: {repro}\n" + text)


def extract_layer(program: Program, layer: str) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """One block of the graph as its own GraphModule; every value it reads becomes a placeholder."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and layer_of(n) == layer]
    if not nodes:
        raise ValueError(f"the graph has no block '{layer}'")
    gm, _, reads, _ = subgraph(nodes)
    return gm, [n.meta["val"] for n in reads]


def layer_mlir(program: Program, layer: str) -> str:
    """The block `layer` imported through torch-mlir's fx importer (raw torch dialect)."""
    from torch_mlir import fx as mlir_fx

    gm, examples = extract_layer(program, layer)
    args = [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in examples]
    return str(mlir_fx.export_and_import(gm, *args, output_type="raw", func_name=layer.replace(".", "_")))

"""Pass dumps, after MLIR's pass instrumentation: graph, stats and diff per pass, MLIR of one layer."""

import difflib
import json
from pathlib import Path

import torch
from torch import fx

from dsv3c.ir import Program, layer_of


def graph_text(program: Program) -> str:
    """The readable graph (print_readable), each node's line tagged with the block it belongs to."""
    text = program.gm.print_readable(print_output=False, include_stride=False, include_device=False)
    layers = {n.name: layer_of(n) for n in program.graph.nodes}
    out = []
    for line in text.splitlines():
        name = line.strip().split(":", 1)[0].split(" ", 1)[0]
        layer = layers.get(name)
        out.append(f"{line}  # {layer}" if layer and " = " in line else line)
    return "\n".join(out) + "\n"


def layer_lines(text: str, layer: str) -> list[str]:
    """The lines of a graph text that belong to one block ('layers.5')."""
    return [line for line in text.splitlines() if line.endswith(f"# {layer}")]


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
            self._write(f"{stem}.mlir", layer_mlir(program, f"layers.{self.mlir_layer}"))

    def write_failure(self, index: int, name: str, text: str, repro: str) -> Path:
        """The input graph of a failed pass and the command that reproduces the failure."""
        return self._write(f"{index:02d}_{name}.FAILED.input.graph.txt", f"# reproduce with: {repro}\n" + text)


def extract_layer(program: Program, layer: str) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """One block of the graph as its own GraphModule; every value it reads becomes a placeholder."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function" and layer_of(n) == layer]
    if not nodes:
        raise ValueError(f"the graph has no block '{layer}'")
    inside = set(nodes)
    sub = fx.Graph()
    env, examples = {}, []

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            env[n] = sub.placeholder(n.name)
            env[n].meta["val"] = n.meta["val"]
            examples.append(n.meta["val"])
        return env[n]

    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a] if a in inside else arg(a))
    outs = [env[n] for n in nodes if any(u not in inside for u in n.users)]
    sub.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), sub), examples


def layer_mlir(program: Program, layer: str) -> str:
    """The block `layer` imported through torch-mlir's fx importer (raw torch dialect)."""
    from torch_mlir import fx as mlir_fx

    gm, examples = extract_layer(program, layer)
    args = [torch.empty(v.shape, dtype=v.dtype, device="meta") for v in examples]
    return str(mlir_fx.export_and_import(gm, *args, output_type="raw", func_name=layer.replace(".", "_")))

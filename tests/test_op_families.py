"""Op families: records are discovered and complete, kernel families hold their tile tables, the legal-op tables of
passes/README.md are the rendering of the records, and a new op family is added by its own files only.

The toy family test writes an op module and a kernel module under tmp_path and runs them in a child Python
(the custom op it registers would otherwise stay in this process's dsv3 namespace for the other tests).
"""

import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dsv3c  # noqa: F401  (registers the dsv3 ops)
import passes
from dsv3c import ops
from dsv3c.codegen import kernels, lowering
from dsv3c.codegen.tiles import Tiles, arches, tile_tables
from dsv3c.ops import RECORDS
from dsv3c.ops.record import NotLowered, OpRecordError, define
from passes import legal_ops
from targets import GPUS, TargetError, get_target, gpu_spec

ROOT = Path(__file__).resolve().parent.parent


# ---- the records ---------------------------------------------------------------------------------------


def test_every_op_module_is_discovered_and_every_record_is_complete():
    modules = {f"dsv3c.ops.{m.name}" for m in pkgutil.iter_modules(ops.__path__)}
    defined_in = {r.module for r in RECORDS.values()} - {"dsv3c.codegen.lowering"}
    assert defined_in <= modules and len(defined_in) >= 5
    assert legal_ops.unknown_stages() == {}
    for name, r in RECORDS.items():
        if r.module in modules:
            assert getattr(ops, name) is r.op  # each op of dsv3c.ops is reachable as dsv3c.ops.<name>
        assert r.doc and r.backward in ("reference", "custom", "none")
        if r.lowered:  # builder and runner live in the family module the record names
            module = r.lowering.builder.split(":")[0]
            assert module.startswith(kernels.__name__ + ".") and r.lowering.runner.startswith(module + ":")
            assert callable(r.lowering.resolve("builder")) and callable(r.lowering.resolve("runner"))


def test_define_needs_a_stage():
    op = object()
    with pytest.raises(TypeError):
        define(op, cost=lambda *a: None, lowering=NotLowered("x"))  # stage is a required keyword
    with pytest.raises(OpRecordError, match="stage"):
        define(op, cost=lambda *a: None, stage="", lowering=NotLowered("x"))
    assert op not in [r.op for r in RECORDS.values()]


def test_pass_adds_and_captured_ops_come_from_the_records():
    for name, p in passes.REGISTRY.items():
        assert p.adds == {op for op, r in RECORDS.items() if r.stage == name}
    assert passes.CAPTURED_OPS == {op for op, r in RECORDS.items() if r.stage == "capture"}
    assert "kernel_call" in passes.REGISTRY["lower_triton"].adds
    assert passes.REGISTRY["lower_triton"].removes == lowering.lowered_ops(always=True)


def test_passes_readme_tables_are_the_rendering_of_the_records():
    readme = legal_ops.README.read_text()
    assert legal_ops.with_tables(readme) == readme, "regenerate with: python -m passes.legal_ops --write"
    for name, r in RECORDS.items():
        assert f"| `{name}` | {r.stage if r.stage == 'capture' else f'`{r.stage}`'} |" in readme


def test_legal_op_table_follows_the_passes():
    """The rendered stage table is the pipeline's legal sets: applying its rows in order gives legal_after."""
    _, rows = legal_ops.stage_table()
    legal = set(rows[0][1].strip("`").split())
    assert legal == passes.CAPTURED_OPS
    for (after, change), name in zip(rows[1:], legal_ops.pass_order(), strict=True):
        assert after == f"`{name}`"
        for part in change.split("; "):
            sign, _, names = part.partition(" ")
            if sign in ("+", "−"):
                ops_ = set(names.strip("`").split())
                legal = legal | ops_ if sign == "+" else legal - ops_
        assert legal == passes.legal_after(legal_ops.pass_order()[: legal_ops.pass_order().index(name) + 1])


# ---- tile tables live in the kernel families ---------------------------------------------------------------


def test_every_kernel_family_declares_its_tile_table():
    families = {m.name for m in pkgutil.iter_modules(kernels.__path__)} - {"common"}
    assert set(tile_tables()) == families
    for name in families:
        assert importlib.import_module(f"{kernels.__name__}.{name}").TILES is tile_tables()[name]
    assert arches() == ["sm_90a", "sm_90"]


@pytest.mark.parametrize("gpu", sorted(GPUS))
@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
def test_tiles(gpu, mode):
    spec = gpu_spec(gpu)
    for family, table in tile_tables().items():
        c = table.config(gpu, mode)
        assert 0 < c["shared_bytes"] <= spec.smem_per_block and c["num_warps"] in (1, 2, 4, 8, 16)
        assert c["num_stages"] >= 1 and c["arch"] == "sm_90a"
        if "gemm" in family:
            assert c["BLOCK_K"] == 128 and c["BLOCK_M"] in (64, 128)
    assert tile_tables()["mla_decode"].config(gpu, mode)["BLOCK_N"] == 64
    assert tile_tables()["fp8_gemm"].config(gpu, "train")["BLOCK_M"] == 128


def test_tiles_shrink_stages_and_reject_unknowns():
    small = dataclasses.replace(gpu_spec("h800"), smem_per_block=100 * 1024)
    gemm = tile_tables()["fp8_gemm"]
    assert gemm.config(small, "train")["num_stages"] < 4 == gemm.config("h800", "train")["num_stages"]
    with pytest.raises(TargetError, match="sm_100a"):
        tile_tables()["rope"].config(dataclasses.replace(gpu_spec("h800"), arch="sm_100a"), "train")
    with pytest.raises(TargetError, match="1024 B per block"):
        gemm.config(dataclasses.replace(gpu_spec("h800"), smem_per_block=1024), "train")
    with pytest.raises(ValueError, match="conv"):
        Tiles(get_target("h800x8"), "train", {"conv": {"BLOCK_M": 16}})


# ---- a new op family touches only its own files ------------------------------------------------------------

TOY_OP = '''
"""A toy op family: y = alpha · x."""

import torch
from torch import Tensor

from dsv3c.ops.record import Lowering, define, elementwise


@torch.library.custom_op("dsv3::toy_scale", mutates_args=())
def toy_scale(x: Tensor, alpha: float) -> Tensor:
    """alpha · x, elementwise."""
    return x * alpha


@toy_scale.register_fake
def _(x, alpha):
    return torch.empty_like(x)


define(toy_scale, cost=elementwise(1, 1.0), stage="capture", autograd=1,
       lowering=Lowering.of("toyfam.kernels", "toy_scale"))
'''

TOY_KERNELS = '''
"""The toy family's kernel: one block of elements per program."""

import math

import torch
import triton
import triton.language as tl

from dsv3c.codegen.family import cdiv, kspec, p2
from dsv3c.codegen.tiles import TileTable, hopper


@triton.jit
def toy_scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, x * alpha, mask=mask)


TILES = TileTable("toy_scale", hopper(dict(BLOCK_M=1, BLOCK_N=256, num_warps=4, num_stages=1)))


def build_toy_scale(ins, outs, attrs, tiles):
    (xs, xd), = ins
    n, cfg = math.prod(xs), tiles(TILES)
    block = min(cfg["BLOCK_N"], max(16, p2(n)))
    return (kspec(f"{__name__}:toy_scale_kernel", ptrs={"x_ptr": xd, "y_ptr": xd}, floats=("alpha",), ints={"n": n},
                  consts={"BLOCK": block}, cfg=cfg, grid=(cdiv(n, block),), shapes={"N": n}, tag=f"toy_scale_{n}"),), ()


def run_toy_scale(call, x):
    (k,) = call.kernels
    y = torch.empty_like(x)
    if y.numel():
        k.launch(x_ptr=x.contiguous(), y_ptr=y, alpha=float(call.attr("alpha")))
    return [y]
'''

# the child: import the toy's op module (as dsv3c.ops imports its own), then use it the way the compiler does
TOY_CHECK = '''
import json, torch
import dsv3c, toyfam.ops
import passes
from passes import legal_ops
from dsv3c.codegen import lowering
from dsv3c.codegen.tiles import tile_tables
from dsv3c.ir import Plan, Program
from dsv3c.ops import RECORDS, check_complete
from dsv3c.passmgr.pipeline import run_pipeline
import targets

check_complete()
r = RECORDS["toy_scale"]
x = torch.randn(5, 300)
out = {"record": [r.stage, r.backward, r.lowered, r.doc], "captured": "toy_scale" in passes.CAPTURED_OPS,
       "table": [row for row in legal_ops.record_table()[1] if row[0] == "`toy_scale`"],
       "stage_row": legal_ops.stage_table()[1][0][1],
       "lowered_removes": "toy_scale" in passes.REGISTRY["lower_triton"].removes,
       "run_op": torch.equal(lowering.run_op("toy_scale", x, alpha=2.5), x * 2.5)}
# a captured graph holding the op, lowered by lower_triton under the pass manager's verification
class Toy(torch.nn.Module):
    def forward(self, x):
        return (torch.ops.dsv3.toy_scale(x, 3.0) + 1,)
gm = torch.export.export(Toy(), (x,)).graph_module
program = Program(gm, {}, ["x"], ["y"], "prefill", None, {})
stats = run_pipeline(Plan(program, targets.get_target("h800x8")), ["lower_triton"], passes.REGISTRY,
                     passes.CAPTURED_OPS)[0].stats
out["lower"] = [stats["by_op"], stats["kernels"], stats["unlowered"]]
out["ops_after"] = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
out["lowered_equal"] = torch.equal(program(x)["y"], x * 3.0 + 1)
out["tiles"] = tile_tables()["toy_scale"].config("h800", "decode")["BLOCK_N"]
out["files"] = [toyfam.ops.__file__, __import__("toyfam.kernels").kernels.__file__]
print(json.dumps(out))
'''


def _project_sources() -> dict[str, str]:
    """sha1 of every source and doc file of the project's packages (what adding an op must not edit)."""
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for package in ("dsv3c", "passes", "targets", "model_def"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in (".py", ".md", ".json", ".toml")]
    return {str(p.relative_to(ROOT)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(files)}


def test_a_toy_op_family_is_added_by_its_own_files_only(tmp_path):
    package = tmp_path / "toyfam"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text(textwrap.dedent(TOY_OP))
    (package / "kernels.py").write_text(textwrap.dedent(TOY_KERNELS))
    before = _project_sources()
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = subprocess.run([sys.executable, "-c", TOY_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["record"] == ["capture", "reference", True, "alpha · x, elementwise."]
    assert got["captured"] and "toy_scale" in got["stage_row"] and got["lowered_removes"]
    assert got["table"] == [["`toy_scale`", "capture", "`toyfam.ops`", "reference", "`toyfam.kernels`",
                             "alpha · x, elementwise."]]
    assert got["run_op"] and got["lowered_equal"]
    assert got["lower"] == [{"toy_scale": 1}, 1, {}]
    assert "dsv3.toy_scale.default" not in got["ops_after"] and "dsv3.kernel_call.default" in got["ops_after"]
    assert got["tiles"] == 256
    assert sorted(Path(f).relative_to(tmp_path).as_posix() for f in got["files"]) == ["toyfam/kernels.py", "toyfam/ops.py"]
    assert _project_sources() == before  # nothing of the project was edited to add the family
    assert "toy_scale" not in RECORDS and "toy_scale" not in tile_tables()  # and nothing leaked into this process

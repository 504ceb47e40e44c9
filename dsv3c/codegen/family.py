"""What a kernel family module builds with: KernelSpec, its shape helpers, kernel variants, and family discovery.

A kernel family is one module of `dsv3c.codegen.kernels` (or any module a new op family brings) holding:
- its @triton.jit kernels;
- its tile table (`dsv3c.codegen.tiles.TileTable`: BLOCK sizes, num_warps, num_stages per GPU arch and mode);
- `k_*` functions: shapes, dtypes and the target's tiles fixed into one `KernelSpec` each;
- `build_<op>(ins, outs, attrs, tiles) -> (KernelSpecs, torch parts)` for each dsv3 op lowered to it: the
  op's shape specialisation, or None where the builder has no kernel for these attributes (the op stays);
- `run_<op>(call, *tensors) -> [outputs]`: allocates, runs the torch parts and launches exactly the
  CallSpec's kernels through `KernelSpec.launch`;
- optionally kernel variants (`variant(__name__, name, **attrs)`): builder/runner pairs that no dsv3 op
  lowers to on its own, reachable through `lowering.run_op`/`aot_specs` for tests and benches.
An op's record names its builder and runner (`Lowering.of(module, op)`); `dsv3c.codegen.lowering` specialises
and runs them. `load_families()` imports every module of `dsv3c.codegen.kernels`, so that their tile tables
and variants are registered; nothing else lists the families.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import os
import pkgutil
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv3c.ops.record import Lowering

QUANT_BLOCK = 128  # 1x128 activation tiles and 128x128 weight blocks of the FP8 recipe
GEMM_MIN_M = 64  # a Hopper warpgroup MMA (wgmma) is 64 rows: GEMM M tiles never shrink below it

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
       torch.int64: "i64", torch.int32: "i32"}


def p2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """a / b rounded up."""
    return -(-a // b)


def row_count(shape) -> int:
    """Product of all but the last dimension."""
    return math.prod(shape[:-1])


def clamp_block(cfg_block: int, dim: int, lo: int = 16) -> int:
    """The target's block size, shrunk to the dim's next power of two (at least lo) when the dim is smaller.

    The floor lo never exceeds the configured block itself: a tile override below it (tests' 16-row GEMM
    tiles) is taken as given."""
    return max(min(lo, cfg_block), min(cfg_block, p2(dim)))


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1): KernelSpec.launch sets EXACT."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ---- kernel specialisations --------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """One Triton kernel specialisation: what the AOT compiler compiles and what the executor launches."""

    kernel: str  # "module:function" of the @triton.jit function
    args: tuple  # ((name, triton type), ...) runtime args passed at launch: pointers and floats
    ints: tuple  # ((name, value), ...) i32 args fixed by the shapes
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int
    grid: tuple  # (x, y, z)
    shapes: tuple  # ((dim name, size), ...) for plan.json
    tag: str  # readable name stem, e.g. 'fp8_gemm_4096x7168x2048' (M x N x K)

    def fn(self):
        """The jit function (an InterpretedFunction under the interpreter)."""
        module, name = self.kernel.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def name(self) -> str:
        """Unique readable name: the tag plus a short content hash."""
        return f"{self.tag}_{hashlib.sha1(repr(self).encode()).hexdigest()[:8]}"

    def signature(self) -> dict:
        """Triton signature of the runtime args, in the function's argument order."""
        types = {**dict(self.args), **{n: "i32" for n, _ in self.ints}}
        return {n: types[n] for n in _arg_names(self.fn()) if n in types}

    def divisible_by_16(self) -> tuple:
        """Pointer args (the runner aligns them to 16 bytes) and shape ints that are multiples of 16."""
        ptrs = tuple(n for n, t in self.args if t.startswith("*"))
        return ptrs + tuple(n for n, v in self.ints if v % 16 == 0 and v > 0)

    def aot(self):
        """The AOTSpec the ahead-of-time compiler takes (EXACT off: compiled kernels round in hardware)."""
        from dsv3c.codegen.triton_aot import AOTSpec

        return AOTSpec(fn=self.fn(), signature=self.signature(), constexprs=dict(self.constexprs),
                       num_warps=self.num_warps, num_stages=self.num_stages, grid=tuple(self.grid),
                       divisible_by_16=self.divisible_by_16())

    def to_json(self) -> dict:
        """A JSON form that `from_json` rebuilds (for compile workers)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: dict) -> "KernelSpec":
        tup = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)  # noqa: E731
        return cls(d["kernel"], tup(d["args"]), tup(d["ints"]), tup(d["constexprs"]), d["num_warps"],
                   d["num_stages"], tuple(d["grid"]), tup(d["shapes"]), d["tag"])

    def launch(self, **values) -> None:
        """Launch the kernel on tensors/floats `values`: the spec's ints, constexprs, options and grid."""
        fn = self.fn()
        ptr_names = {n for n, t in self.args if t.startswith("*")}
        given = set(values)
        if given != {n for n, _ in self.args}:
            raise TypeError(f"{self.tag}: launch got {sorted(given)}, expects {[n for n, _ in self.args]}")
        consts = dict(self.constexprs)
        if "EXACT" in consts:
            consts["EXACT"] = interpreting()
        allv = {**values, **dict(self.ints), **consts}
        for n in ptr_names:
            allv[n] = _aligned(allv[n])
        ordered = [allv[n] for n in _arg_names(fn)]
        fn[tuple(self.grid)](*ordered, num_warps=self.num_warps, num_stages=self.num_stages)


def _arg_names(fn) -> list[str]:
    """Argument names of a jit (or interpreted) function."""
    return list(inspect.signature(getattr(fn, "fn", fn)).parameters)


def _aligned(t):
    """t itself if its data is 16-byte aligned, else an aligned copy (the specs assume aligned pointers)."""
    if isinstance(t, Tensor) and t.data_ptr() % 16:
        return t.clone()
    return t


def kspec(kernel: str, *, ptrs: dict, floats: tuple = (), ints: dict, consts: dict, cfg: dict, grid, shapes: dict,
          tag: str, num_warps: int | None = None, num_stages: int | None = None) -> KernelSpec:
    """A KernelSpec from pointer dtypes, float arg names, shape ints, constexprs and a tile config."""
    args = tuple((n, "*" + _TL[d]) for n, d in ptrs.items()) + tuple((n, "fp32") for n in floats)
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    return KernelSpec(
        kernel=kernel, args=args, ints=tuple((n, int(v)) for n, v in ints.items()),
        constexprs=tuple(consts.items()), num_warps=int(num_warps or cfg["num_warps"]),
        num_stages=int(num_stages or cfg["num_stages"]), grid=grid,
        shapes=tuple((n, int(v)) for n, v in shapes.items()), tag=tag,
    )  # fmt: skip


# ---- kernel variants and family discovery -----------------------------------------------------------

REQUIRED = object()  # a variant attribute without a default


@dataclass(frozen=True)
class Variant:
    """A kernel entry point no dsv3 op lowers to on its own: its builder/runner pair and attributes (name -> default)."""

    lowering: Lowering
    attrs: dict


VARIANTS: dict[str, Variant] = {}


def variant(module: str, name: str, **attrs) -> None:
    """Register kernel variant `name` of family module `module` (its build_<name>/run_<name>) taking attrs
    (default values, or REQUIRED)."""
    VARIANTS[name] = Variant(Lowering.of(module, name), attrs)


def load_families() -> None:
    """Import every kernel family module of dsv3c.codegen.kernels (registering their tile tables and variants)."""
    from dsv3c.codegen import kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"{kernels.__name__}.{info.name}")

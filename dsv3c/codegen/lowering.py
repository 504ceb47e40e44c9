"""Lowering to Triton: the `dsv3.kernel_call` op, shape specialisations of the dsv3 ops, and their runners.

The kernel-call op
    dsv3::kernel_call(str spec, Tensor[] args) -> Tensor[]
replaces one dsv3 compute op node. `spec` names a `CallSpec` in this module's registry: the original op,
its non-tensor arguments, the shapes and dtypes of its tensor inputs and outputs (it is specialised by
shape), and the `KernelSpec`s it launches (one per Triton kernel specialisation: jit function, argument
types, shape-derived integer arguments, constexprs, num_warps/num_stages from the target's tile table,
grid). Spec ids are content hashes, so equal shapes give equal ids in every run and every process.

- fake impl: checks the inputs against the spec and returns empties of the original op's output shapes;
- real impl (CPU and CUDA): runs the op's runner, which launches exactly the spec's kernels with the spec's
  constexprs, options and grid (`KernelSpec.launch`): on CPU under Triton's interpreter (TRITON_INTERPRET=1,
  constexpr EXACT on), on CUDA through the normal Triton launch. The compiled artifacts of the same
  KernelSpecs are what `dsv3c.codegen.kernel_build` writes under <out>/kernels/.

Some steps of an op have no kernel in the library and run as torch inside the runner; each CallSpec lists
them in `torch_parts` and the pass reports them: the router's FP32 logits GEMM (the router kernel takes
logits), sorting tokens by expert and the weighted combine of the MoE experts, the 128x128 weight
quantisation of training's master weights, and copying the latent cache into 64-token pages for MLA decode.

Tile configs: `targets.tile_config(gpu, family, mode)` gives BLOCK sizes, num_warps and num_stages. A block larger
than its dimension shrinks to the dimension's next power of two (not below 16, the smallest tl.dot, nor below
64 rows for the FP8 GEMMs, one Hopper wgmma); row kernels (RMSNorm, SwiGLU, RoPE) size their row block from
the row length and use no more warps than the row fills. MLA decode splits long contexts (flash-decoding)
to fill the target's compute SMs (`targets.compute_sms`: H800 train/prefill leave 20 SMs to communication).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

import targets
from dsv3c.ops import RECORDS, Cost, NotLowered, fp8, record_of
from dsv3c.ops.record import define

QUANT_BLOCK = 128
PAGE = 64


_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
       torch.int64: "i64", torch.int32: "i32"}


def _p2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


GEMM_MIN_M = 64  # a Hopper warpgroup MMA (wgmma) is 64 rows: GEMM M tiles never shrink below it


def _clamp_block(cfg_block: int, dim: int, lo: int = 16) -> int:
    """The target's block size, shrunk to the dim's next power of two (at least lo) when the dim is smaller."""
    return max(lo, min(cfg_block, _p2(dim)))


def interpreting() -> bool:
    """Whether Triton runs on its CPU interpreter."""
    from dsv3c.codegen.kernels.common import interpreting as interp

    return interp()


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


def _kspec(kernel: str, *, ptrs: dict, floats: tuple = (), ints: dict, consts: dict, cfg: dict, grid, shapes: dict,
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


# ---- call specialisations and the kernel-call op -----------------------------------------------------


@dataclass(frozen=True)
class CallSpec:
    """One shape specialisation of a dsv3 op: what a kernel_call node with this id computes and launches."""

    id: str
    op: str
    attrs: tuple  # ((name, value), ...) the op's non-tensor arguments
    inputs: tuple  # ((shape, dtype), ...) of the tensor arguments, in order
    outputs: tuple  # ((shape, dtype), ...) of the results
    kernels: tuple  # KernelSpecs the runner launches (in launch order, each once)
    torch_parts: tuple = ()  # steps of the op run as torch, not Triton

    def attr(self, name: str):
        return dict(self.attrs)[name]

    def to_json(self) -> dict:
        """A JSON form that `from_json` rebuilds (lowered-program artifacts)."""
        spec = lambda specs: [[list(shape), str(dtype).replace("torch.", "")] for shape, dtype in specs]  # noqa: E731
        return {"id": self.id, "op": self.op, "attrs": [[n, _attr_json(v)] for n, v in self.attrs],
                "inputs": spec(self.inputs), "outputs": spec(self.outputs),
                "kernels": [k.to_json() for k in self.kernels], "torch_parts": list(self.torch_parts)}

    @classmethod
    def from_json(cls, d: dict) -> "CallSpec":
        spec = lambda specs: tuple((tuple(s), getattr(torch, dt)) for s, dt in specs)  # noqa: E731
        return cls(d["id"], d["op"], tuple((n, _attr_from_json(v)) for n, v in d["attrs"]), spec(d["inputs"]),
                   spec(d["outputs"]), tuple(KernelSpec.from_json(k) for k in d["kernels"]), tuple(d["torch_parts"]))

    def check(self, args) -> None:
        """Raise ValueError unless args have the shapes and dtypes this specialisation was made for."""
        got = tuple((tuple(a.shape), a.dtype) for a in args)
        if got != self.inputs:
            raise ValueError(f"kernel_call {self.id}: specialised for {self.inputs}, called with {got}")


SPECS: dict[str, CallSpec] = {}


def _attr_json(value):
    """A call attribute as JSON (dtypes as {'dtype': name})."""
    return {"dtype": str(value).replace("torch.", "")} if isinstance(value, torch.dtype) else value


def _attr_from_json(value):
    """The call attribute of its JSON form."""
    return getattr(torch, value["dtype"]) if isinstance(value, dict) else value


def register_specs(specs) -> None:
    """Make specialisations loaded from an artifact callable by kernel_call in this process."""
    for spec in specs:
        SPECS.setdefault(spec.id, spec)


def get_spec(spec_id: str) -> CallSpec:
    """The registered CallSpec of an id (made by lowering in this process)."""
    try:
        return SPECS[spec_id]
    except KeyError:
        raise KeyError(f"unknown kernel specialisation {spec_id!r}; lower the graph in this process") from None


@torch.library.custom_op("dsv3::kernel_call", mutates_args=())
def kernel_call(spec: str, args: list[Tensor]) -> list[Tensor]:
    """Run specialisation `spec` (a lowered dsv3 op) on args with its Triton kernels."""
    call = get_spec(spec)
    call.check(args)
    with torch.no_grad():
        outs = record_of(call.op).lowering.resolve("runner")(call, *args)
    for o, (shape, dtype) in zip(outs, call.outputs, strict=True):
        assert tuple(o.shape) == shape and o.dtype == dtype, (call.id, o.shape, o.dtype, shape, dtype)
    return [o.contiguous() for o in outs]


@kernel_call.register_fake
def _(spec, args):
    call = get_spec(spec)
    call.check(args)
    device = args[0].device if args else "meta"
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in call.outputs]


def kernel_call_cost(spec, args, out) -> Cost:
    """The cost of the op the specialisation lowers, at the specialisation's shapes."""
    call = get_spec(spec)
    values = iter(args)
    attrs = dict(call.attrs)
    schema = getattr(torch.ops.dsv3, call.op).default._schema
    full = [attrs[a.name] if a.name in attrs else next(values) for a in schema.arguments]
    return record_of(call.op).cost(*full, out if len(out) > 1 else out[0])


define(kernel_call, cost=kernel_call_cost, lowering=NotLowered("is the lowered form: a Triton kernel launch"))


def lowered_ops(always: bool = False) -> frozenset:
    """The dsv3 ops lower_triton replaces by kernel calls (with always, only those it replaces whatever their attributes)."""
    return frozenset(name for name, r in RECORDS.items() if r.lowered and not (always and r.lowering.partial))


def unlowered_reasons() -> dict:
    """The dsv3 ops that stay torch ops after lowering, with the reason (the kernel call itself excluded)."""
    out = {n: r.lowering.reason for n, r in RECORDS.items() if not r.lowered and n != "kernel_call"}
    out.update({n: r.lowering.partial for n, r in RECORDS.items() if r.lowered and r.lowering.partial})
    return out


# ---- per-op specialisation (builders) ----------------------------------------------------------------


class Tiles:
    """Tile configs of the target GPU for one mode, looked up once per family."""

    def __init__(self, target, mode: str):
        self.target = target
        self.gpu = target.gpu if target is not None else targets.gpu_spec("h800")
        self.mode = mode
        self.sms = targets.compute_sms(target, mode) if target is not None else self.gpu.sms
        self._memo: dict = {}

    def __call__(self, family: str) -> dict:
        if family not in self._memo:
            self._memo[family] = targets.tile_config(self.gpu, family, self.mode)
        return self._memo[family]

    def key(self) -> tuple:
        return (self.gpu.name, self.gpu.arch, self.mode, self.sms)


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def k_rmsnorm(rows: int, n: int, xd, wd, yd, tiles: Tiles) -> KernelSpec:
    cfg = tiles("rmsnorm")
    block = max(16, _p2(n))
    return _kspec("dsv3c.codegen.kernels.rmsnorm:rmsnorm_kernel", ptrs={"x_ptr": xd, "w_ptr": wd, "y_ptr": yd},
                  floats=("eps",), ints={"N": n, "stride_x": n, "stride_y": n},
                  consts={"BLOCK_N": block, "EXACT": False}, cfg=cfg, grid=(rows,),
                  num_warps=max(1, min(cfg["num_warps"], block // 256)), shapes={"rows": rows, "N": n},
                  tag=f"rmsnorm_{rows}x{n}")


def k_act_quant(m: int, k: int, xd, pow2: bool, tiles: Tiles) -> KernelSpec:
    cfg = tiles("act_quant")
    bm = max(1, min(cfg["BLOCK_M"], _p2(m)))
    return _kspec("dsv3c.codegen.kernels.act_quant:act_quant_kernel",
                  ptrs={"x_ptr": xd, "y_ptr": fp8.FP8, "s_ptr": torch.float32}, ints={"M": m, "K": k},
                  consts={"BLOCK_M": bm, "BLOCK_K": QUANT_BLOCK, "POW2": bool(pow2), "EXACT": False}, cfg=cfg,
                  grid=(_cdiv(m, bm), _cdiv(k, QUANT_BLOCK)), shapes={"M": m, "K": k},
                  tag=f"act_quant_{m}x{k}" + ("_pow2" if pow2 else ""))


def k_fp8_gemm(m: int, n: int, k: int, tiles: Tiles) -> KernelSpec:
    cfg = tiles("fp8_gemm")
    bm, bn = _clamp_block(cfg["BLOCK_M"], m, GEMM_MIN_M), _clamp_block(cfg["BLOCK_N"], n)
    ptrs = {"a_ptr": fp8.FP8, "as_ptr": torch.float32, "b_ptr": fp8.FP8, "bs_ptr": torch.float32,
            "c_ptr": torch.bfloat16}
    return _kspec("dsv3c.codegen.kernels.fp8_gemm:fp8_gemm_kernel", ptrs=ptrs, ints={"M": m, "N": n, "K": k},
                  consts={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": cfg["BLOCK_K"], "EXACT": False}, cfg=cfg,
                  grid=(_cdiv(m, bm), _cdiv(n, bn)), shapes={"M": m, "N": n, "K": k}, tag=f"fp8_gemm_{m}x{n}x{k}")


def k_grouped(t: int, e: int, n: int, k: int, tiles: Tiles) -> KernelSpec:
    cfg = tiles("grouped_fp8_gemm")
    bm = _clamp_block(cfg["BLOCK_M"], max(1, t // max(e, 1)), GEMM_MIN_M)  # rows per expert on average
    bn = _clamp_block(cfg["BLOCK_N"], n)
    ptrs = {"a_ptr": fp8.FP8, "as_ptr": torch.float32, "b_ptr": fp8.FP8, "bs_ptr": torch.float32,
            "c_ptr": torch.bfloat16, "offsets_ptr": torch.int32}
    return _kspec("dsv3c.codegen.kernels.grouped_fp8_gemm:grouped_fp8_gemm_kernel", ptrs=ptrs, ints={"N": n, "K": k, "E": e},
                  consts={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": cfg["BLOCK_K"], "E_POW2": _p2(e), "EXACT": False},
                  cfg=cfg, grid=(_cdiv(t, bm) + min(e, t), _cdiv(n, bn)), shapes={"T": t, "E": e, "N": n, "K": k},
                  tag=f"grouped_fp8_gemm_{t}x{e}x{n}x{k}")


def _swiglu_blocks(m: int, f: int, quant: bool, cfg: dict) -> tuple[int, int]:
    block_f = max(min(_p2(f), cfg["BLOCK_N"]), 128 if quant else 16)
    return max(1, min(_p2(m), 4096 // block_f)), block_f


def k_swiglu(m: int, f: int, dt, tiles: Tiles) -> KernelSpec:
    cfg = tiles("swiglu")
    bm, bf = _swiglu_blocks(m, f, False, cfg)
    return _kspec("dsv3c.codegen.kernels.swiglu:swiglu_kernel", ptrs={"g_ptr": dt, "u_ptr": dt, "h_ptr": dt},
                  ints={"M": m, "F": f, "sg": f, "su": f, "sh": f},
                  consts={"BLOCK_M": bm, "BLOCK_F": bf, "EXACT": False}, cfg=cfg, grid=(_cdiv(m, bm), _cdiv(f, bf)),
                  shapes={"M": m, "F": f}, tag=f"swiglu_{m}x{f}")


def k_swiglu_quant(m: int, f: int, dt, tiles: Tiles) -> KernelSpec:
    cfg = tiles("swiglu")
    bm, bf = _swiglu_blocks(m, f, True, cfg)
    ptrs = {"g_ptr": dt, "u_ptr": dt, "q_ptr": fp8.FP8, "s_ptr": torch.float32}
    return _kspec("dsv3c.codegen.kernels.swiglu:swiglu_quant_kernel", ptrs=ptrs,
                  ints={"M": m, "F": f, "sg": f, "su": f, "sq": f, "ss": _cdiv(f, QUANT_BLOCK)},
                  consts={"BLOCK_M": bm, "BLOCK_F": bf, "POW2": False, "EXACT": False}, cfg=cfg,
                  grid=(_cdiv(m, bm), _cdiv(f, bf)), shapes={"M": m, "F": f}, tag=f"swiglu_quant_{m}x{f}")


def build_rms_norm(ins, outs, attrs, tiles):
    (xs, xd), (_, wd) = ins
    (_, yd), = outs
    return (k_rmsnorm(_rows(xs), xs[-1], xd, wd, yd, tiles),), ()


def build_rope(ins, outs, attrs, tiles):
    (xs, xd), (cs, cd), (_, sd) = ins
    b, s = xs[:2]
    h = xs[2] if len(xs) == 4 else 1
    d = xs[-1]
    half = d // 2
    cfg = tiles("rope")
    bh = max(1, min(cfg["BLOCK_M"], _p2(h)))
    ints = {"S": s, "H": h, "HALF": half, "sxb": s * h * d, "sxs": h * d, "sxh": d, "scb": s * half, "scs": half,
            "ssb": s * half, "sss": half, "syb": s * h * d, "sys": h * d, "syh": d}
    k = _kspec("dsv3c.codegen.kernels.rope:rope_kernel", ptrs={"x_ptr": xd, "cos_ptr": cd, "sin_ptr": sd, "y_ptr": xd},
               ints=ints, consts={"BLOCK_H": bh, "BLOCK_HALF": _p2(half), "EXACT": False}, cfg=cfg,
               grid=(b * s, _cdiv(h, bh)), shapes={"B": b, "S": s, "H": h, "D": d}, tag=f"rope_{b}x{s}x{h}x{d}")
    return (k,), ()


def build_swiglu(ins, outs, attrs, tiles):
    (gs, gd), _ = ins
    return (k_swiglu(_rows(gs), gs[-1], gd, tiles),), ()


def build_act_quant(ins, outs, attrs, tiles):
    (xs, xd), = ins
    return (k_act_quant(_rows(xs), xs[-1], xd, attrs["pow2_scale"], tiles),), ()


def build_fp8_gemm(ins, outs, attrs, tiles):
    (xs, _), _, (ws, _), _ = ins
    return (k_fp8_gemm(_rows(xs), ws[0], xs[-1], tiles),), ()


def build_fp8_linear(ins, outs, attrs, tiles):
    (xs, xd), (ws, _) = ins
    m, k = _rows(xs), xs[-1]
    return (k_act_quant(m, k, xd, False, tiles), k_fp8_gemm(m, ws[0], k, tiles)), ("weight_quant",)


def build_moe_gate(ins, outs, attrs, tiles):
    (xs, _), (ws, _), (_, bd) = ins
    t, e = xs[0], ws[0]
    cfg = tiles("router")
    n_group, top_k = attrs["n_group"], attrs["top_k"]
    block_t = max(1, min(cfg["BLOCK_M"], _p2(t)))
    consts = dict(N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=attrs["topk_group"], TOP_K=top_k,
                  NORM=bool(attrs["norm_topk_prob"]), BLOCK_T=block_t, BLOCK_E=_p2(e), BLOCK_G=_p2(n_group),
                  BLOCK_K=_p2(top_k))
    ptrs = {"logits_ptr": torch.float32, "bias_ptr": bd, "w_ptr": torch.float32, "id_ptr": torch.int64}
    k = _kspec("dsv3c.codegen.kernels.router:router_kernel", ptrs=ptrs, floats=("scaling",),
               ints={"T": t, "E": e, "stride_l": e, "stride_w": top_k, "stride_i": top_k}, consts=consts, cfg=cfg,
               grid=(_cdiv(t, block_t),), shapes={"T": t, "E": e, "k": top_k}, tag=f"router_{t}x{e}_top{top_k}")
    return (k,), ("router_logits_gemm",)


def _moe_kernels(t: int, k: int, e: int, f: int, d: int, dt, tiles):
    tk = t * k
    return (k_act_quant(tk, d, dt, False, tiles), k_grouped(tk, e, f, d, tiles), k_swiglu_quant(tk, f, dt, tiles),
            k_grouped(tk, e, d, f, tiles))


def build_moe_experts_fp8(ins, outs, attrs, tiles):
    (xs, xd), (ids, _), _, (gq, _), *_ = ins
    e, f, d = gq
    return _moe_kernels(xs[0], ids[1], e, f, d, xd, tiles), ("token_sort", "weighted_combine")


def build_moe_experts_fp8_train(ins, outs, attrs, tiles):
    (xs, xd), (ids, _), _, (wg, _), *_ = ins
    e, f, d = wg
    return _moe_kernels(xs[0], ids[1], e, f, d, xd, tiles), ("weight_quant", "token_sort", "weighted_combine")


def build_ep_experts(ins, outs, attrs, tiles):
    """The received routes' experts on the grouped FP8 GEMMs (one route per row); None unless the GEMMs are FP8."""
    if not attrs["fp8_gemms"]:
        return None  # BF16 expert GEMMs: no kernel (as moe_experts), the op stays
    (xs, xd), (tok, _), _, (wg, _), *_ = ins
    s, f, d = wg
    return _moe_kernels(tok[0], 1, s, f, d, xd, tiles), ("weight_quant", "route_sort", "route_gather")


def build_ep_experts_fp8(ins, outs, attrs, tiles):
    """As build_ep_experts over E4M3 local weights."""
    (xs, xd), (tok, _), _, (gq, _), *_ = ins
    s, f, d = gq
    return _moe_kernels(tok[0], 1, s, f, d, xd, tiles), ("route_sort", "route_gather")


def build_mla_attention(ins, outs, attrs, tiles):
    from dsv3c.codegen.kernels.attention_prefill import head_split

    (qs, qd), (ks, _), (vs, _) = ins
    b, s, h, dqk = qs
    t, dv = ks[1], vs[-1]
    cfg = tiles("attention_prefill")
    bm, bn = _clamp_block(cfg["BLOCK_M"], s), _clamp_block(cfg["BLOCK_N"], t)
    da, db = head_split(dqk)
    ints = {"S": s, "T": t, "H": h, "sqb": s * h * dqk, "sqs": h * dqk, "sqh": dqk, "skb": t * h * dqk,
            "skt": h * dqk, "skh": dqk, "svb": t * h * dv, "svt": h * dv, "svh": dv, "sob": s * h * dv, "sos": h * dv,
            "soh": dv}
    consts = dict(DQK=dqk, DV=dv, DA=da, DB=db, BLOCK_DV=max(16, _p2(dv)), BLOCK_M=bm, BLOCK_N=bn, EXACT=False)
    k = _kspec("dsv3c.codegen.kernels.attention_prefill:prefill_attention_kernel",
               ptrs={"q_ptr": qd, "k_ptr": qd, "v_ptr": qd, "o_ptr": qd}, floats=("sm_scale",), ints=ints,
               consts=consts, cfg=cfg, grid=(_cdiv(s, bm), b * h), shapes={"B": b, "S": s, "T": t, "H": h, "Dqk": dqk,
                                                                            "Dv": dv},
               tag=f"attention_prefill_{b}x{s}x{t}x{h}")
    return (k,), ()


def _latent_dims(r: int, dr: int) -> tuple[int, int]:
    """Latent and rope widths padded to powers of two >= 16 (tensor-core K; zero padding leaves dots unchanged)."""
    return max(16, _p2(r)), max(16, _p2(dr))


def build_latent_attention(ins, outs, attrs, tiles):
    from dsv3c.codegen.kernels.mla_decode import default_splits

    (qs, qd), _, (cs, cd), _ = ins
    b, s, h, r = qs
    t, dr = cs[1], ins[3][0][-1]
    rp, drp = _latent_dims(r, dr)
    cfg = tiles("mla_decode")
    rows = b * s  # each query token is its own "sequence" whose length ends at its causal position
    pps = _cdiv(t, PAGE)
    bh = max(16, min(cfg["BLOCK_H"], _p2(h)))
    bn = max(16, min(cfg["BLOCK_N"], _p2(t), PAGE))
    splits = default_splits(rows, h, pps * PAGE, bh, tiles.sms)
    ptrs = {"ql_ptr": qd, "qp_ptr": qd, "kv_ptr": cd, "bt_ptr": torch.int32, "len_ptr": torch.int32, "o_ptr": qd,
            "part_ptr": torch.float32, "lse_ptr": torch.float32}
    ints = {"H": h, "sql_b": h * rp, "sql_h": rp, "sqp_b": h * drp, "sqp_h": drp, "s_page": PAGE * (rp + drp),
            "s_tok": rp + drp, "sbt_b": pps, "so_b": h * rp, "so_h": rp}
    shapes = {"B": b, "S": s, "T": t, "H": h, "R": r, "Dr": dr}
    main = _kspec("dsv3c.codegen.kernels.mla_decode:mla_decode_kernel", ptrs=ptrs, floats=("sm_scale",), ints=ints,
                  consts=dict(R=rp, DR=drp, PAGE_SIZE=PAGE, BLOCK_H=bh, BLOCK_N=bn, NUM_SPLITS=splits, EXACT=False),
                  cfg=cfg, grid=(rows, _cdiv(h, bh), splits), shapes=shapes, tag=f"mla_decode_{b}x{s}x{t}x{h}")
    kernels = (main,)
    if splits > 1:
        kernels += (_kspec("dsv3c.codegen.kernels.mla_decode:mla_combine_kernel",
                           ptrs={"part_ptr": torch.float32, "lse_ptr": torch.float32, "o_ptr": qd},
                           ints={"H": h, "so_b": h * rp, "so_h": rp},
                           consts=dict(R=rp, NUM_SPLITS=splits, BLOCK_S=_p2(splits), EXACT=False), cfg=cfg,
                           grid=(rows * h,), num_warps=4, num_stages=1, shapes=shapes,
                           tag=f"mla_combine_{b}x{s}x{t}x{h}"),)
    return kernels, ("paged_cache_copy",)




# ---- runners: run a specialisation's kernels on real tensors -----------------------------------------


def _run_act_quant_rows(kq: KernelSpec, x2: Tensor) -> tuple[Tensor, Tensor]:
    m, k = x2.shape
    q = torch.empty(m, k, dtype=fp8.FP8, device=x2.device)
    s = torch.empty(m, _cdiv(k, QUANT_BLOCK), dtype=torch.float32, device=x2.device)
    if m and k:
        kq.launch(x_ptr=x2.contiguous(), y_ptr=q, s_ptr=s)
    return q, s


def _run_gemm_rows(kg: KernelSpec, a: Tensor, a_s: Tensor, wq: Tensor, ws: Tensor) -> Tensor:
    m, n = a.shape[0], wq.shape[0]
    c = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m and n:
        kg.launch(a_ptr=a.contiguous(), as_ptr=a_s.contiguous(), b_ptr=wq.contiguous(), bs_ptr=ws.contiguous(),
                  c_ptr=c)
    return c


def run_rms_norm(call, x, w):
    (k,) = call.kernels
    n = x.shape[-1]
    y = torch.empty(_rows(x.shape), n, dtype=call.outputs[0][1], device=x.device)
    if y.numel():
        k.launch(x_ptr=x.reshape(-1, n).contiguous(), w_ptr=w.contiguous(), y_ptr=y, eps=float(call.attr("eps")))
    return [y.reshape(x.shape)]


def run_rope(call, x, cos, sin):
    (k,) = call.kernels
    b, s, d = x.shape[0], x.shape[1], x.shape[-1]
    half = d // 2
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        k.launch(x_ptr=x.contiguous(), cos_ptr=cos.expand(b, s, half).contiguous(),
                 sin_ptr=sin.expand(b, s, half).contiguous(), y_ptr=y)
    return [y]


def run_swiglu(call, gate, up):
    (k,) = call.kernels
    f = gate.shape[-1]
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if h.numel():
        k.launch(g_ptr=gate.reshape(-1, f).contiguous(), u_ptr=up.reshape(-1, f).contiguous(), h_ptr=h)
    return [h]


def run_act_quant(call, x):
    (k,) = call.kernels
    q, s = _run_act_quant_rows(k, x.reshape(-1, x.shape[-1]))
    return [q.reshape(x.shape), s.reshape(*x.shape[:-1], s.shape[-1])]


def run_fp8_gemm(call, xq, xs, wq, ws):
    (k,) = call.kernels
    y = _run_gemm_rows(k, xq.reshape(-1, xq.shape[-1]), xs.reshape(-1, xs.shape[-1]), wq, ws)
    return [y.to(call.attr("out_dtype")).reshape(*xq.shape[:-1], wq.shape[0])]


def run_fp8_linear(call, x, w):
    kq, kg = call.kernels
    xq, xs = _run_act_quant_rows(kq, x.reshape(-1, x.shape[-1]))
    wq, ws = fp8.weight_quant(w)  # torch part: 128x128 block quantisation of the master weight
    y = _run_gemm_rows(kg, xq, xs, wq, ws)
    return [y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])]


def run_moe_gate(call, x, weight, bias):
    (k,) = call.kernels
    t, top_k = x.shape[0], call.attr("top_k")
    logits = x.float() @ weight.float().t()  # torch part: the FP32 router GEMM (as ref.moe_gate)
    w = torch.empty(t, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=x.device)
    if t:
        k.launch(logits_ptr=logits.contiguous(), bias_ptr=bias.contiguous(), w_ptr=w, id_ptr=ids,
                 scaling=float(call.attr("scaling")))
    return [w, ids]


def _run_moe(call, x, ids, weights, packed):
    """Routed experts on grouped FP8 GEMMs: sort token copies by expert, gate/up, SwiGLU+quant, down, combine."""
    kq, kgu, ksw, kd = call.kernels
    t, top_k = ids.shape
    e = packed[0][0].shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # torch part: token_sort
    offsets = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.bincount(flat, minlength=e).cumsum(0).to(torch.int32)
    tokens = order // top_k
    aq, a_s = _run_act_quant_rows(kq, x[tokens])
    (gq, gs), (uq, us), (dq, ds) = packed
    gate = _grouped(kgu, aq, a_s, gq, gs, offsets)
    up = _grouped(kgu, aq, a_s, uq, us, offsets)
    f = gate.shape[1]
    hq = torch.empty(gate.shape, dtype=fp8.FP8, device=x.device)
    hs = torch.empty(gate.shape[0], _cdiv(f, QUANT_BLOCK), dtype=torch.float32, device=x.device)
    if hq.numel():
        ksw.launch(g_ptr=gate.to(x.dtype), u_ptr=up.to(x.dtype), q_ptr=hq, s_ptr=hs)
    y = _grouped(kd, hq, hs, dq, ds, offsets)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # torch part: weighted_combine
    out.index_add_(0, tokens, y.float() * weights.reshape(-1)[order, None].float())
    return [out.to(x.dtype)]


def _grouped(k: KernelSpec, aq, a_s, wq, ws, offsets) -> Tensor:
    c = torch.zeros(aq.shape[0], wq.shape[1], dtype=torch.bfloat16, device=aq.device)
    if c.numel() and aq.shape[1]:
        k.launch(a_ptr=aq, as_ptr=a_s, b_ptr=wq.contiguous(), bs_ptr=ws.contiguous(), c_ptr=c, offsets_ptr=offsets)
    return c


def _run_routes(call, x, tok, slot, packed):
    """Per-route expert outputs: routes sorted by slot (padding, slot -1, last and left zero), grouped FP8 GEMMs."""
    kq, kgu, ksw, kd = call.kernels
    s = packed[0][0].shape[0]
    key = torch.where(slot >= 0, slot, s)
    order = torch.argsort(key, stable=True)  # torch part: route_sort
    offsets = torch.zeros(s + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.bincount(key, minlength=s + 1)[:s].cumsum(0).to(torch.int32)
    rows = torch.where(slot[order] >= 0, tok[order], 0)  # torch part: route_gather
    aq, a_s = _run_act_quant_rows(kq, x[rows])
    (gq, gs), (uq, us), (dq, ds) = packed
    gate = _grouped(kgu, aq, a_s, gq, gs, offsets)
    up = _grouped(kgu, aq, a_s, uq, us, offsets)
    hq = torch.empty(gate.shape, dtype=fp8.FP8, device=x.device)
    hs = torch.empty(gate.shape[0], _cdiv(gate.shape[1], QUANT_BLOCK), dtype=torch.float32, device=x.device)
    if hq.numel():
        ksw.launch(g_ptr=gate.to(x.dtype), u_ptr=up.to(x.dtype), q_ptr=hq, s_ptr=hs)
    y = _grouped(kd, hq, hs, dq, ds, offsets)
    out = torch.zeros(y.shape, dtype=torch.bfloat16, device=x.device)
    out[order] = y
    return [out]


def run_ep_experts(call, recv_x, recv_tok, recv_slot, w_gate, w_up, w_down):
    packed = tuple(fp8.weight_quant(w) for w in (w_gate, w_up, w_down))  # torch part: weight_quant
    return _run_routes(call, recv_x, recv_tok, recv_slot, packed)


def run_ep_experts_fp8(call, recv_x, recv_tok, recv_slot, gq, gs, uq, us, dq, ds):
    return _run_routes(call, recv_x, recv_tok, recv_slot, ((gq, gs), (uq, us), (dq, ds)))


def run_moe_experts_fp8(call, x, ids, weights, gq, gs, uq, us, dq, ds):
    return _run_moe(call, x, ids, weights, ((gq, gs), (uq, us), (dq, ds)))


def run_moe_experts_fp8_train(call, x, ids, weights, w_gate, w_up, w_down):
    packed = tuple(fp8.weight_quant(w) for w in (w_gate, w_up, w_down))  # torch part: weight_quant
    return _run_moe(call, x, ids, weights, packed)


def run_mla_attention(call, q, k, v):
    (kern,) = call.kernels
    b, s, h, _ = q.shape
    o = torch.empty((b, s, h, v.shape[-1]), dtype=q.dtype, device=q.device)
    if o.numel():
        kern.launch(q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(), o_ptr=o,
                    sm_scale=float(call.attr("scale")))
    return [o]


def run_latent_attention(call, q_lat, q_pe, ckv, kpe):
    kernels = call.kernels
    b, s, h, r = q_lat.shape
    t, dr = ckv.shape[1], kpe.shape[-1]
    rp, drp = _latent_dims(r, dr)
    pps = _cdiv(t, PAGE)
    dev, dt = q_lat.device, q_lat.dtype
    # torch part: the latent cache copied into 64-token pages [B * pps, 64, rp + drp] (zero-padded widths)
    cache = torch.zeros(b, pps * PAGE, rp + drp, dtype=ckv.dtype, device=dev)
    cache[:, :t, :r] = ckv
    cache[:, :t, rp:rp + dr] = kpe
    cache = cache.reshape(b * pps, PAGE, rp + drp)
    ql = torch.zeros(b * s, h, rp, dtype=dt, device=dev)
    ql[..., :r] = q_lat.reshape(b * s, h, r)
    qp = torch.zeros(b * s, h, drp, dtype=dt, device=dev)
    qp[..., :dr] = q_pe.reshape(b * s, h, dr)
    table = (torch.arange(b, device=dev)[:, None] * pps + torch.arange(pps, device=dev)[None, :]).to(torch.int32)
    table = table.repeat_interleave(s, dim=0).contiguous()  # query (b, i) reads sequence b's pages
    lens = (t - s + 1 + torch.arange(s, device=dev)).repeat(b).to(torch.int32)  # causal: keys <= its position
    o = torch.empty(b * s, h, rp, dtype=dt, device=dev)
    splits = dict(kernels[0].constexprs)["NUM_SPLITS"]
    part = torch.empty(b * s, h, splits, rp, dtype=torch.float32, device=dev)
    lse = torch.empty(b * s, h, splits, dtype=torch.float32, device=dev)
    kernels[0].launch(ql_ptr=ql, qp_ptr=qp, kv_ptr=cache, bt_ptr=table, len_ptr=lens, o_ptr=o, part_ptr=part,
                      lse_ptr=lse, sm_scale=float(call.attr("scale")))
    if splits > 1:
        kernels[1].launch(part_ptr=part, lse_ptr=lse, o_ptr=o)
    return [o[..., :r].reshape(b, s, h, r)]




def specialise(op: str, ins: tuple, outs: tuple, attrs: tuple, tiles: Tiles) -> CallSpec | None:
    """The CallSpec of op at these input/output specs and attrs, registered under its content-hash id (None when
    the builder has no kernel for these attributes)."""
    built = record_of(op).lowering.resolve("builder")(ins, outs, dict(attrs), tiles)
    if built is None:
        return None
    kernels, torch_parts = built
    material = repr((op, ins, outs, attrs, tiles.key(), kernels))
    spec_id = f"{op}_{hashlib.sha1(material.encode()).hexdigest()[:12]}"
    if spec_id not in SPECS:
        SPECS[spec_id] = CallSpec(spec_id, op, attrs, ins, outs, tuple(kernels), tuple(torch_parts))
    return SPECS[spec_id]


def kernel_call_op():
    """The kernel_call overload nodes call."""
    return torch.ops.dsv3.kernel_call.default


def kernel_uses(specs_with_counts) -> dict[KernelSpec, dict]:
    """Distinct KernelSpecs over (CallSpec, node count) pairs: the dsv3 ops each serves and its launch count."""
    uses: dict[KernelSpec, dict] = {}
    for spec, count in specs_with_counts:
        for k in spec.kernels:
            u = uses.setdefault(k, {"ops": set(), "calls": 0})
            u["ops"].add(spec.op)
            u["calls"] += count
    return uses


def kernel_entry(k: KernelSpec, use: dict, record: dict | None, rel_dir: str) -> dict:
    """The plan.json entry of one kernel specialisation (its compiled record, when compiled)."""
    entry = {
        "name": k.name, "kernel": k.kernel.split(":")[1], "op": ",".join(sorted(use["ops"])),
        "shapes": dict(k.shapes), "calls": use["calls"], "grid": list(k.grid),
        "constexprs": {n: v for n, v in k.constexprs if n != "EXACT"},
    }  # fmt: skip
    if record is not None:
        entry.update(arch=record["arch"], num_warps=record["num_warps"], num_stages=record["num_stages"],
                     shared_bytes=record["shared_bytes"],
                     files={ext: f"{rel_dir}/{f}" for ext, f in sorted(record["files"].items())})
    else:
        entry.update(arch=None, num_warps=k.num_warps, num_stages=k.num_stages, shared_bytes=None, files={})
    return entry

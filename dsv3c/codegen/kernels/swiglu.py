"""SwiGLU kernels: h = silu(gate) ⊙ up over [M, F], plus a variant fused with 1x128 FP8 quantisation of h.

gate and up are [..., F] tensors with unit stride along F (they may be the two halves of one fused
gate_up GEMM output). One program covers BLOCK_M rows x BLOCK_F columns; BLOCK_F is a multiple of 128
in the fused variant so that each 1x128 tile's amax is a register reduction. Rounding follows torch:
silu(gate) is rounded to the input dtype before the product.
"""

import torch
import triton
import triton.language as tl

from dsv3c.codegen.kernels.common import TL_DTYPE, cast_out, interpreting, quant_tiles



@triton.jit
def _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, EXACT: tl.constexpr):
    """This program's (rows, cols, mask, h) with h = silu(g) ⊙ u rounded like torch, as float32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    r64 = rows[:, None].to(tl.int64)
    g = tl.load(g_ptr + r64 * sg + cols[None, :], mask=mask, other=0.0)
    u = tl.load(u_ptr + r64 * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g32 = g.to(tl.float32)
    silu = cast_out(g32 / (1.0 + tl.exp(-g32)), g.dtype, EXACT).to(tl.float32)
    h = cast_out(silu * u, g.dtype, EXACT).to(tl.float32)
    return rows, cols, mask, h


@triton.jit
def swiglu_kernel(
    g_ptr, u_ptr, h_ptr, M, F, sg, su, sh,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, EXACT: tl.constexpr,
):
    """h[m, f] = silu(gate[m, f]) · up[m, f] for one BLOCK_M x BLOCK_F tile."""
    rows, cols, mask, h = _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M, BLOCK_F, EXACT)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * sh + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_quant_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, M, F, sg, su, sq, ss,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, POW2: tl.constexpr, EXACT: tl.constexpr,
):
    """act_quant(silu(gate) · up) for one tile: e4m3 values and a float32 scale per 1x128 tile."""
    rows, cols, mask, h = _swiglu_tile(g_ptr, u_ptr, M, F, sg, su, BLOCK_M, BLOCK_F, EXACT)
    q, scale = quant_tiles(h, BLOCK_M, BLOCK_F, POW2, EXACT)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * sq + cols[None, :], q, mask=mask)
    t = tl.program_id(1) * (BLOCK_F // 128) + tl.arange(0, BLOCK_F // 128)
    smask = (rows[:, None] < M) & (t[None, :] < tl.cdiv(F, 128))
    tl.store(s_ptr + rows[:, None].to(tl.int64) * ss + t[None, :], scale, mask=smask)


def _blocks(m: int, f: int, quant: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_F): up to 1024 columns (a multiple of 128 when quantising), about 4K values a tile."""
    block_f = min(triton.next_power_of_2(f), 1024)
    block_f = max(block_f, 128 if quant else 16)
    block_m = max(1, min(triton.next_power_of_2(m), 4096 // block_f))
    return block_m, block_f


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., F] as a [M, F] view (or copy) with unit stride along F."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ref.swiglu: silu(gate) ⊙ up for gate, up [..., F] of one dtype."""
    assert gate.shape == up.shape and gate.dtype == up.dtype
    g, u = _rows(gate), _rows(up)
    m, f = g.shape
    h = torch.empty((m, f), dtype=gate.dtype, device=gate.device)
    if h.numel():
        bm, bf = _blocks(m, f, False)
        swiglu_kernel[(triton.cdiv(m, bm), triton.cdiv(f, bf))](
            g, u, h, m, f, g.stride(0), u.stride(0), h.stride(0), BLOCK_M=bm, BLOCK_F=bf, EXACT=interpreting(),
            num_warps=4,
        )
    return h.reshape(gate.shape)


def launch_quant(gate: torch.Tensor, up: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(swiglu(gate, up)): (hq e4m3 [..., F], scale float32 [..., ceil(F/128)])."""
    assert gate.shape == up.shape and gate.dtype == up.dtype
    g, u = _rows(gate), _rows(up)
    m, f = g.shape
    q = torch.empty((m, f), dtype=torch.float8_e4m3fn, device=gate.device)
    s = torch.empty((m, triton.cdiv(f, 128)), dtype=torch.float32, device=gate.device)
    if q.numel():
        bm, bf = _blocks(m, f, True)
        swiglu_quant_kernel[(triton.cdiv(m, bm), triton.cdiv(f, bf))](
            g, u, q, s, m, f, g.stride(0), u.stride(0), q.stride(0), s.stride(0),
            BLOCK_M=bm, BLOCK_F=bf, POW2=pow2_scale, EXACT=interpreting(), num_warps=4,
        )
    return q.reshape(gate.shape), s.reshape(*gate.shape[:-1], s.shape[-1])


def aot_spec(m: int = 4096, f: int = 2048, dtype: torch.dtype = torch.bfloat16, quant: bool = False,
             pow2_scale: bool = False):
    """AOTSpec of (quant-fused) SwiGLU on [m, f] (an expert's width 2048 by default)."""
    from dsv3c.codegen.triton_aot import AOTSpec

    t = TL_DTYPE[dtype]
    bm, bf = _blocks(m, f, quant)
    if quant:
        sig = {"g_ptr": f"*{t}", "u_ptr": f"*{t}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "M": "i32", "F": "i32",
               "sg": "i32", "su": "i32", "sq": "i32", "ss": "i32"}
        consts = {"BLOCK_M": bm, "BLOCK_F": bf, "POW2": pow2_scale, "EXACT": False}
        fn = swiglu_quant_kernel
    else:
        sig = {"g_ptr": f"*{t}", "u_ptr": f"*{t}", "h_ptr": f"*{t}", "M": "i32", "F": "i32", "sg": "i32",
               "su": "i32", "sh": "i32"}
        consts = {"BLOCK_M": bm, "BLOCK_F": bf, "EXACT": False}
        fn = swiglu_kernel
    div16 = tuple(a for a in sig if a.endswith("_ptr") or (len(a) == 2 and a[0] == "s" and f % 16 == 0))
    return AOTSpec(fn=fn, signature=sig, constexprs=consts, num_warps=4, num_stages=1,
                   grid=(triton.cdiv(m, bm), triton.cdiv(f, bf), 1), divisible_by_16=div16)

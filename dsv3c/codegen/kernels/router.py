"""Sigmoid group-limited top-k router (DeepSeek-V3 `noaux_tc`) over router logits, one program per token block.

Split of work: the router GEMM logits = x·W_gateᵀ ([T, 7168] x [7168, 256], FP32 as in ref.moe_gate) stays
in torch (the moe_gate op's runner below does it); the Triton kernel does everything after it, which is the part
torch runs as a dozen small kernels: s = sigmoid(logits); s + b; per group the sum of its top-2 (s + b);
keep the topk_group best groups; pick the top-k experts of the kept groups by (s + b); gather their
plain s; normalise to sum 1 (optional; in log space, so underflowing scores keep their ratios);
multiply by the routed scaling factor.

Each selection is an iterated argmax, which takes the lowest index among exact ties: the tie rule of
ref.moe_gate (lowest group / expert index wins), so the ids and their order equal the reference's.
Experts are padded to a power of two; groups are contiguous slices of GROUP_SIZE experts and need
not be a power of two.

After the @triton.jit code: the family's tile table, its KernelSpec builders (`k_*`), and the builder and
runner of each op lowered to it (`dsv3c.codegen.family` says what each is), with their imports, so that
editing the host side moves no kernel (Triton's cache key holds a kernel's first line number).
"""

import triton
import triton.language as tl


@triton.jit
def _normalised_sigmoid(x, valid):
    """s_j / Σ s per row over the valid columns for s = sigmoid(x), in log space like ref.normalised_sigmoid."""
    ls = tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))  # log sigmoid, without overflow
    ls = tl.where(valid[None, :], ls, float("-inf"))
    r = tl.exp(ls - tl.max(ls, axis=1)[:, None])
    return r / tl.sum(r, axis=1)[:, None]


@triton.jit
def router_kernel(
    logits_ptr, bias_ptr, w_ptr, id_ptr, T, E, stride_l, stride_w, stride_i, scaling,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Routing of BLOCK_T tokens: weights g [T, k] (float32) and expert ids [T, k], like ref.moe_gate."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    valid = cols < E
    r64 = rows[:, None].to(tl.int64)
    logits = tl.load(logits_ptr + r64 * stride_l + cols[None, :], mask=rmask[:, None] & valid[None, :], other=0.0)
    scores = tl.sigmoid(logits.to(tl.float32))
    bias = tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    biased = tl.where(valid[None, :], scores + bias[None, :], float("-inf"))
    grp = cols // GROUP_SIZE

    # group score: sum of the two largest (s + b) in each group (the largest alone for groups of one)
    gcols = tl.arange(0, BLOCK_G)
    gscore = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    for g in tl.static_range(N_GROUP):
        v = tl.where((grp == g)[None, :], biased, float("-inf"))
        best = tl.max(v, axis=1)
        if GROUP_SIZE >= 2:
            first = tl.argmax(v, axis=1)
            v = tl.where(cols[None, :] == first[:, None], float("-inf"), v)
            best = best + tl.max(v, axis=1)
        gscore = tl.where((gcols == g)[None, :], best[:, None], gscore)

    # keep the TOPK_GROUP best groups; experts outside them cannot be chosen
    keep = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        gi = tl.argmax(gscore, axis=1, tie_break_left=True)
        keep = keep | (grp[None, :] == gi[:, None])
        gscore = tl.where(gcols[None, :] == gi[:, None], float("-inf"), gscore)
    choice = tl.where(keep & valid[None, :], biased, float("-inf"))

    # top-k experts by (s + b), weights from the plain s
    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    weights = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    # normalised: log-sigmoid of the chosen logits, as ref.normalised_sigmoid (robust where sigmoid underflows)
    picked = logits.to(tl.float32) if NORM else scores
    for j in tl.static_range(TOP_K):
        ei = tl.argmax(choice, axis=1, tie_break_left=True)
        hit = cols[None, :] == ei[:, None]
        sj = tl.sum(tl.where(hit, picked, 0.0), axis=1)
        ids = tl.where((kcols == j)[None, :], ei[:, None], ids)
        weights = tl.where((kcols == j)[None, :], sj[:, None], weights)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        weights = _normalised_sigmoid(weights, kcols < TOP_K)
    weights = weights * scaling

    omask = rmask[:, None] & (kcols < TOP_K)[None, :]
    tl.store(w_ptr + r64 * stride_w + kcols[None, :], weights, mask=omask)
    tl.store(id_ptr + r64 * stride_i + kcols[None, :], ids.to(id_ptr.dtype.element_ty), mask=omask)


# ---- host side ------------------------------------------------------------------------------------------

import torch

from dsv3c.codegen.family import cdiv, kspec, p2
from dsv3c.codegen.tiles import TileTable, hopper


def router_shared_bytes(c: dict) -> int:
    """Pipelined bf16 token and gate rows."""
    return c["num_stages"] * 2 * (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"]


TILES = TileTable("router", hopper(dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=2)),  # 256 experts
                  router_shared_bytes)


def build_moe_gate(ins, outs, attrs, tiles):
    """moe_gate: the router kernel over FP32 logits, which the runner computes in torch."""
    (xs, _), (ws, _), (_, bd) = ins
    t, e = xs[0], ws[0]
    cfg = tiles(TILES)
    n_group, top_k = attrs["n_group"], attrs["top_k"]
    block_t = max(1, min(cfg["BLOCK_M"], p2(t)))
    consts = dict(N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=attrs["topk_group"], TOP_K=top_k,
                  NORM=bool(attrs["norm_topk_prob"]), BLOCK_T=block_t, BLOCK_E=p2(e), BLOCK_G=p2(n_group),
                  BLOCK_K=p2(top_k))
    ptrs = {"logits_ptr": torch.float32, "bias_ptr": bd, "w_ptr": torch.float32, "id_ptr": torch.int64}
    k = kspec(f"{__name__}:router_kernel", ptrs=ptrs, floats=("scaling",),
              ints={"T": t, "E": e, "stride_l": e, "stride_w": top_k, "stride_i": top_k}, consts=consts, cfg=cfg,
              grid=(cdiv(t, block_t),), shapes={"T": t, "E": e, "k": top_k}, tag=f"router_{t}x{e}_top{top_k}")
    return (k,), ("router_logits_gemm",)


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

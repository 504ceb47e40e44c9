"""Sigmoid group-limited top-k router (DeepSeek-V3 `noaux_tc`) over router logits, one program per token block.

Split of work: the router GEMM logits = x·W_gateᵀ ([T, 7168] x [7168, 256], FP32 as in ref.moe_gate) stays
in torch (`moe_gate` below does it); the Triton kernel does everything after it, which is the part
torch runs as a dozen small kernels: s = sigmoid(logits); s + b; per group the sum of its top-2 (s + b);
keep the topk_group best groups; pick the top-k experts of the kept groups by (s + b); gather their
plain s; normalise to sum 1 (optional; in log space, so underflowing scores keep their ratios);
multiply by the routed scaling factor.

Each selection is an iterated argmax, which takes the lowest index among exact ties: the tie rule of
ref.moe_gate (lowest group / expert index wins), so the ids and their order equal the reference's.
Experts are padded to a power of two; groups are contiguous slices of GROUP_SIZE experts and need
not be a power of two.
"""

import torch
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


def _meta(e: int, n_group: int, top_k: int) -> dict:
    """The block constexprs for e experts in n_group groups picking top_k (a [BLOCK_T, BLOCK_E] tile of ~2K)."""
    block_e = triton.next_power_of_2(e)
    return dict(BLOCK_T=max(1, min(64, 2048 // block_e)), BLOCK_E=block_e,
                BLOCK_G=triton.next_power_of_2(n_group), BLOCK_K=triton.next_power_of_2(top_k))


def launch(
    logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
    norm_topk_prob: bool, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing from router logits [T, E]: (weights [T, k] float32, ids [T, k] int64) as ref.moe_gate."""
    t, e = logits.shape
    assert e % n_group == 0 and topk_group <= n_group and top_k <= topk_group * (e // n_group)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    meta = _meta(e, n_group, top_k)
    if t:
        router_kernel[(triton.cdiv(t, meta["BLOCK_T"]),)](
            logits, bias.contiguous(), weights, ids, t, e, logits.stride(0), weights.stride(0), ids.stride(0),
            float(scaling), N_GROUP=n_group, GROUP_SIZE=e // n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
            NORM=bool(norm_topk_prob), num_warps=4, **meta,
        )
    return weights, ids


def moe_gate(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
    norm_topk_prob: bool, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ref.moe_gate for tokens x [T, D]: the FP32 router GEMM in torch, then the Triton selection kernel."""
    logits = x.float() @ weight.float().t()
    return launch(logits, bias, n_group, topk_group, top_k, norm_topk_prob, scaling)


def aot_spec(tokens: int = 4096, experts: int = 256, n_group: int = 8, topk_group: int = 4, top_k: int = 8,
             norm_topk_prob: bool = True):
    """AOTSpec of the router selection for [tokens, experts] float32 logits (the 671B routing by default)."""
    from dsv3c.codegen.triton_aot import AOTSpec

    meta = _meta(experts, n_group, top_k)
    sig = {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "id_ptr": "*i64", "T": "i32", "E": "i32",
           "stride_l": "i32", "stride_w": "i32", "stride_i": "i32", "scaling": "fp32"}
    consts = dict(N_GROUP=n_group, GROUP_SIZE=experts // n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
                  NORM=norm_topk_prob, **meta)
    div16 = ("logits_ptr", "bias_ptr", "w_ptr", "id_ptr") + (("stride_l",) if experts % 16 == 0 else ())
    return AOTSpec(fn=router_kernel, signature=sig, constexprs=consts, num_warps=4, num_stages=1,
                   grid=(triton.cdiv(tokens, meta["BLOCK_T"]), 1, 1), divisible_by_16=div16)

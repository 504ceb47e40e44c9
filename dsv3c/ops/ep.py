"""Expert-parallel ops: dispatch → local grouped experts → combine, over a torch.distributed EP group.

One rank-parametric SPMD program: every EP rank runs the same graph on its own micro-batch of tokens
x [T, D]; the layer's placement tables (phy2log [P], log2phy [E, R] padded -1, logcnt [E]; slots
numbered GPU-major, rank r holds slots r·S .. r·S+S−1 with S = P / ep) are graph inputs, so which
logical experts a rank holds is bound at run time (as DeepSeek's model.py binds `rank * n_local_experts`).

- `ep_dispatch(x, ids, phy2log, log2phy, logcnt, ep, layer, quant, gpus_per_node, exp_nodes, exp_gpus)`
  routes each (token, k) pair to a physical slot (replica `(global token index) mod logcnt[e]` of its
  logical expert e), sends every token ONCE to each EP rank holding one of its experts (tokens per
  destination, then per-route metadata: the token's row at the destination and the local slot), with
  the counts exchanged first by an all-to-all of [ep, 2] ints. With `quant` the payload travels as
  E4M3 codes plus 1x128 float32 scales (`dsv3c.ops.fp8.act_quant`) and is dequantised on arrival: the
  FP8 expert GEMM re-quantises it with the same 1x128 tiles, which reproduces the codes exactly, so
  "dequantise on arrival" costs no accuracy against carrying codes into the GEMM. Without `quant`
  (the unquantised recipe) the payload travels in x's dtype.
  Outputs (static shapes, padded; ep·T tokens and ep·T·k routes are the most a rank can receive):
  recv_x [ep·T, D], recv_tok [ep·T·k] (row of recv_x, -1 = padding), recv_slot [ep·T·k] (local slot,
  -1 = padding), counts [4, ep] (tokens sent / received, routes sent / received per peer),
  route_order [T·k] (this rank's flat (t, j) routes in send order), send_tok [ep·T] (token sent per
  row, -1 = padding).
- `ep_experts(recv_x, recv_tok, recv_slot, w_gate [S, F, D], w_up, w_down, fp8, ep)` — SwiGLU per received
  route with the rank's local expert weights (`fp8`: every GEMM a `dsv3.fp8_linear`, as in
  `moe_experts_fp8_train`) → per-route outputs y [ep·T·k, D] (BF16 under fp8, else x's dtype).
  `ep_experts_fp8` is the inference variant over E4M3 weights and their 128x128 block scales.
- `ep_combine(y, weights, counts, route_order, ep, gpus_per_node, out_dtype)` sends every route's output back to its
  token's home rank (in y's dtype: BF16 under the FP8 recipe) and sums Σ_j g[t, j]·y[t, j] there
  in float32.

Autograd is explicit: dispatch's backward sends the gradients of the received tokens back to their
home ranks (combine direction) and sums them per token; combine's backward sends g·dy to the expert
ranks (dispatch direction) and computes dg on the home rank. Gradients travel in the forward dtype.

With no EP context active (`dsv3c.ops.ep_context`) the ops run on one rank: ep must be 1 and
every exchange is the identity. `simulate_ep` runs the same stages for all ranks in one process.

Each op has a `cost_<op>(args, out) -> dict` (flops, bwd_flops, bytes, ib_bytes, nvlink_bytes) over
its argument meta values in schema order. `ep`, `gpus_per_node` and the expected distinct nodes / GPUs
per token (`exp_nodes`, `exp_gpus`, computed by expert_partition from the placement) are op arguments so
that the costs need no data; `layer` (the MoE layer's index in graph order) keys the observed loads.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsv3c.ops import fp8, ref
from dsv3c.ops.record import Cost, Lowering, NotLowered, define, expected_experts_hit

# ---- stages (pure functions shared by the ops and by simulate_ep) ---------------------------------


def route_slots(ids: Tensor, log2phy: Tensor, logcnt: Tensor, ep: int, slots: int, rank: int):
    """(destination rank, local slot) of every route (t, j): replica (rank·T + t) mod logcnt of expert ids[t, j]."""
    t = ids.shape[0]
    per_rank = slots // ep
    token = rank * t + torch.arange(t, device=ids.device)[:, None]
    replica = token % logcnt[ids]
    slot = log2phy[ids, replica]
    return slot // per_rank, slot % per_rank


def pack(x: Tensor, ids: Tensor, log2phy: Tensor, logcnt: Tensor, ep: int, slots: int, rank: int, quant: bool):
    """The send side of dispatch: tokens grouped by destination (each once), per-route metadata, counts."""
    t, k = ids.shape
    dst, local = route_slots(ids, log2phy, logcnt, ep, slots, rank)
    hit = torch.zeros(t, ep, dtype=torch.bool, device=x.device)
    hit.scatter_(1, dst, True)
    pairs = hit.t().nonzero()  # (destination, token), destination-major
    send_tok = pairs[:, 1]
    tok_counts = hit.sum(0)
    pos = hit.long().cumsum(0) - 1  # row of token t in the list sent to d
    flat_dst = dst.reshape(-1)
    order = torch.argsort(flat_dst, stable=True)
    route_counts = torch.bincount(flat_dst, minlength=ep)
    meta = torch.stack([pos.gather(1, dst).reshape(-1)[order], local.reshape(-1)[order]], 1)
    payload = x[send_tok]
    if quant:
        codes, scales = fp8.act_quant(payload)
        payload = (codes.view(torch.uint8), scales)
    else:
        payload = (payload,)
    return {"dst": dst, "send_tok": send_tok, "tok_counts": tok_counts, "route_counts": route_counts,
            "order": order, "meta": meta, "payload": payload}  # fmt: skip


def unpack(payload: tuple, meta: Tensor, recv_tok_counts: Tensor, recv_route_counts: Tensor, dtype, quant: bool):
    """The receive side of dispatch: (tokens [Rt, D] in dtype, their row per route, local slot per route)."""
    if quant:
        codes, scales = payload
        xr = fp8.act_dequant(codes.view(fp8.FP8), scales).to(dtype)
    else:
        xr = payload[0]
    ep = recv_tok_counts.numel()
    offset = torch.cumsum(recv_tok_counts, 0) - recv_tok_counts
    src = torch.repeat_interleave(torch.arange(ep, device=meta.device), recv_route_counts)
    return xr, meta[:, 0] + offset[src], meta[:, 1]


def _pad(t: Tensor, rows: int, fill) -> Tensor:
    """t padded with `fill` rows to `rows` rows."""
    out = t.new_full((rows, *t.shape[1:]), fill)
    out[: t.shape[0]] = t
    return out


def experts_ref(recv_x, recv_tok, recv_slot, w_gate, w_up, w_down, fp8_gemms: bool, ep: int = 1) -> Tensor:
    """Per-route SwiGLU outputs y[i] = FFN_{slot[i]}(x[tok[i]]) (zeros on padding)."""
    out_dtype = torch.bfloat16 if fp8_gemms else recv_x.dtype
    y = torch.zeros(recv_tok.shape[0], recv_x.shape[1], dtype=out_dtype, device=recv_x.device)
    lin = torch.ops.dsv3.fp8_linear if fp8_gemms else (lambda a, w: a @ w.t())
    for s in torch.unique(recv_slot[recv_slot >= 0]).tolist():
        rows = (recv_slot == s).nonzero().squeeze(-1)
        xe = recv_x[recv_tok[rows]]
        he = lin(ref.swiglu(lin(xe, w_gate[s]), lin(xe, w_up[s])), w_down[s])
        y = y.index_copy(0, rows, he.to(out_dtype))
    return y


def home_sum(y_sorted: Tensor, order: Tensor, weights: Tensor, out_dtype) -> Tensor:
    """Σ_j g[t, j] · y[t, j] in float32 from the routes' outputs in send order."""
    t, k = weights.shape
    y_home = torch.empty_like(y_sorted)
    y_home[order] = y_sorted
    y_home = y_home.view(t, k, -1)
    return (weights.float().unsqueeze(-1) * y_home.float()).sum(1).to(out_dtype), y_home


# ---- exchange ---------------------------------------------------------------------------------------


def _context(ep: int):
    """The active EP context (checked against ep), or None when ep == 1 runs locally."""
    from dsv3c.ops.ep_context import current

    ctx = current()
    if ctx is None:
        if ep != 1:
            raise RuntimeError(f"the EP ops were built for ep={ep} but no EP group is active (dsv3c.ops.ep_context)")
        return None
    if ctx.size != ep:
        raise RuntimeError(f"the EP ops were built for ep={ep} but the active EP group has {ctx.size} ranks")
    return ctx


def _a2a(ctx, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
    """all_to_all_single of t's rows: send[d] rows to rank d, recv[s] rows from rank s (identity without a group)."""
    if ctx is None:
        return t.clone()
    import torch.distributed as dist

    out = t.new_empty((sum(recv), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv, send, group=ctx.group)
    return out


def _exchange_counts(ctx, counts: Tensor) -> Tensor:
    """[ep, c] ints: row d goes to rank d; returns row s received from rank s (the counts go first)."""
    return _a2a(ctx, counts, [1] * counts.shape[0], [1] * counts.shape[0])


# ---- ep_dispatch ------------------------------------------------------------------------------------


@torch.library.custom_op("dsv3::ep_dispatch", mutates_args=())
def ep_dispatch(
    x: Tensor, ids: Tensor, phy2log: Tensor, log2phy: Tensor, logcnt: Tensor, ep: int, layer: int, quant: bool,
    gpus_per_node: int, exp_nodes: float, exp_gpus: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Send this rank's tokens x [T, D] to the EP ranks holding their routed experts (FP8 + 1x128 scales if quant)."""
    ctx = _context(ep)
    rank = ctx.rank if ctx else 0
    t, k = ids.shape
    sent = pack(x, ids, log2phy, logcnt, ep, phy2log.numel(), rank, quant)
    if ctx is not None and ctx.observe:
        _observe(ctx, layer, ids, sent["dst"], logcnt.numel())
    send_counts = torch.stack([sent["tok_counts"], sent["route_counts"]], 1)
    recv_counts = _exchange_counts(ctx, send_counts)
    st, rt = sent["tok_counts"].tolist(), recv_counts[:, 0].tolist()
    sr, rr = sent["route_counts"].tolist(), recv_counts[:, 1].tolist()
    payload = tuple(_a2a(ctx, p, st, rt) for p in sent["payload"])
    meta = _a2a(ctx, sent["meta"], sr, rr)
    xr, tok, slot = unpack(payload, meta, recv_counts[:, 0], recv_counts[:, 1], x.dtype, quant)
    counts = torch.stack([sent["tok_counts"], recv_counts[:, 0], sent["route_counts"], recv_counts[:, 1]])
    return (
        _pad(xr, ep * t, 0), _pad(tok, ep * t * k, -1), _pad(slot, ep * t * k, -1), counts,
        sent["order"].clone(), _pad(sent["send_tok"], ep * t, -1),
    )  # fmt: skip


@ep_dispatch.register_fake
def _(x, ids, phy2log, log2phy, logcnt, ep, layer, quant, gpus_per_node, exp_nodes, exp_gpus):
    t, k = ids.shape
    i64 = torch.int64
    return (
        x.new_empty((ep * t, x.shape[1])), x.new_empty((ep * t * k,), dtype=i64), x.new_empty((ep * t * k,), dtype=i64),
        x.new_empty((4, ep), dtype=i64), x.new_empty((t * k,), dtype=i64), x.new_empty((ep * t,), dtype=i64),
    )  # fmt: skip


def _observe(ctx, layer: int, ids: Tensor, dst: Tensor, experts: int) -> None:
    """Record the routing: tokens per logical expert, and the most nodes / GPUs one token reached."""
    load = torch.bincount(ids.reshape(-1), minlength=experts)
    ctx.load[layer] = ctx.load.get(layer, 0) + load
    for per, attr in ((ctx.gpus_per_node, "max_nodes_per_token"), (1, "max_gpus_per_token")):
        where = dst // per
        distinct = (torch.zeros(dst.shape[0], int(where.max()) + 1, dtype=torch.bool).scatter_(1, where, True)).sum(1)
        setattr(ctx, attr, max(getattr(ctx, attr), int(distinct.max()) if distinct.numel() else 0))


def _dispatch_setup(ctx, inputs, output):
    x, ids = inputs[:2]
    ctx.ep = inputs[5]
    ctx.shape, ctx.dtype = x.shape, x.dtype
    ctx.save_for_backward(output[3], output[5])


def _dispatch_backward(ctx, grad_x, *_):
    counts, send_tok = ctx.saved_tensors
    ep_ctx = _context(ctx.ep)
    grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=counts.device)
    if grad_x is None:
        return (grad, *[None] * 10)
    rt, st = counts[1].tolist(), counts[0].tolist()
    back = _a2a(ep_ctx, grad_x[: sum(rt)].to(ctx.dtype), rt, st)  # combine direction
    grad.index_add_(0, send_tok[: sum(st)], back)
    return (grad, *[None] * 10)



# ---- ep_experts -------------------------------------------------------------------------------------


@torch.library.custom_op("dsv3::ep_experts", mutates_args=())
def ep_experts(
    recv_x: Tensor, recv_tok: Tensor, recv_slot: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, fp8_gemms: bool,
    ep: int,
) -> Tensor:
    """Grouped SwiGLU over this rank's local experts (w_* [S, ...]) for each received route → y [routes, D]."""
    return experts_ref(recv_x, recv_tok, recv_slot, w_gate, w_up, w_down, fp8_gemms)


@ep_experts.register_fake
def _(recv_x, recv_tok, recv_slot, w_gate, w_up, w_down, fp8_gemms, ep):
    return recv_x.new_empty((recv_tok.shape[0], recv_x.shape[1]), dtype=torch.bfloat16 if fp8_gemms else recv_x.dtype)



def _experts_fp8_ref(recv_x, recv_tok, recv_slot, gq, gs, uq, us, dq, ds):
    """Inference variant: E4M3 local weights with 128x128 block scales, activations quantised per GEMM."""

    def gemm(a, wq, ws):
        aq, a_s = fp8.act_quant(a)
        return fp8.fp8_gemm(aq, a_s, wq, ws, torch.bfloat16)

    y = torch.zeros(recv_tok.shape[0], recv_x.shape[1], dtype=torch.bfloat16, device=recv_x.device)
    for s in torch.unique(recv_slot[recv_slot >= 0]).tolist():
        rows = (recv_slot == s).nonzero().squeeze(-1)
        xe = recv_x[recv_tok[rows]]
        y[rows] = gemm(ref.swiglu(gemm(xe, gq[s], gs[s]), gemm(xe, uq[s], us[s])), dq[s], ds[s])
    return y


@torch.library.custom_op("dsv3::ep_experts_fp8", mutates_args=())
def ep_experts_fp8(
    recv_x: Tensor, recv_tok: Tensor, recv_slot: Tensor, gq: Tensor, gs: Tensor, uq: Tensor, us: Tensor, dq: Tensor,
    ds: Tensor, ep: int,
) -> Tensor:  # fmt: skip
    """Grouped FP8 SwiGLU over this rank's local E4M3 experts for each received route → y [routes, D] BF16."""
    return _experts_fp8_ref(recv_x, recv_tok, recv_slot, gq, gs, uq, us, dq, ds)


@ep_experts_fp8.register_fake
def _(recv_x, recv_tok, recv_slot, gq, gs, uq, us, dq, ds, ep):
    return recv_x.new_empty((recv_tok.shape[0], recv_x.shape[1]), dtype=torch.bfloat16)


# ---- ep_combine -------------------------------------------------------------------------------------


@torch.library.custom_op("dsv3::ep_combine", mutates_args=())
def ep_combine(
    y: Tensor, weights: Tensor, counts: Tensor, route_order: Tensor, ep: int, gpus_per_node: int, out_dtype: torch.dtype
) -> Tensor:
    """Send every route's output y back to its token's home rank and sum Σ_j g[t, j]·y[t, j] there → [T, D]."""
    ctx = _context(ep)
    sr, rr = counts[2].tolist(), counts[3].tolist()
    y_sorted = _a2a(ctx, y[: sum(rr)], rr, sr)
    return home_sum(y_sorted, route_order, weights, out_dtype)[0]


@ep_combine.register_fake
def _(y, weights, counts, route_order, ep, gpus_per_node, out_dtype):
    return y.new_empty((weights.shape[0], y.shape[1]), dtype=out_dtype)


def _combine_setup(ctx, inputs, output):
    y, weights, counts, order, ep, _, _ = inputs
    ctx.ep, ctx.rows, ctx.ydtype = ep, y.shape[0], y.dtype
    ctx.save_for_backward(y, weights, counts, order)


def _combine_backward(ctx, grad_out):
    y, weights, counts, order = ctx.saved_tensors
    ep_ctx = _context(ctx.ep)
    sr, rr = counts[2].tolist(), counts[3].tolist()
    t, k = weights.shape
    # the forward's returned rows again (one all-to-all of the outputs; saving y_home instead would save it)
    y_sorted = _a2a(ep_ctx, y[: sum(rr)], rr, sr)
    y_home = torch.empty_like(y_sorted)
    y_home[order] = y_sorted
    y_home = y_home.view(t, k, -1).float()
    g = grad_out.float()
    grad_w = (g.unsqueeze(1) * y_home).sum(-1).to(weights.dtype)
    grad_y_home = (weights.float().unsqueeze(-1) * g.unsqueeze(1)).reshape(t * k, -1).to(ctx.ydtype)
    back = _a2a(ep_ctx, grad_y_home[order], sr, rr)  # dispatch direction
    grad_y = torch.zeros(ctx.rows, back.shape[1], dtype=ctx.ydtype, device=back.device)
    grad_y[: back.shape[0]] = back
    return grad_y, grad_w, None, None, None, None, None



# ---- single-process simulation of all ranks ----------------------------------------------------------


def _sim_a2a(bufs: list[Tensor], send: list[list[int]]) -> list[Tensor]:
    """all_to_all_single for all ranks at once: recv[r] = the rows every rank s sent to r, in s order."""
    parts = [b.split(c) for b, c in zip(bufs, send)]
    return [torch.cat([parts[s][r] for s in range(len(bufs))]) for r in range(len(bufs))]


def simulate_ep(x_per_rank, ids_per_rank, weights_per_rank, placement, expert_weights, quant: bool = False,
                fp8_gemms: bool = False) -> list[Tensor]:  # fmt: skip
    """What all EP ranks together compute for one MoE layer: each rank's routed-expert output [T, D].

    placement = (phy2log [P], log2phy [E, R], logcnt [E]); expert_weights = (w_gate, w_up, w_down) over
    logical experts [E, ...]; rank r binds slots r·S .. r·S+S−1 (S = P / ranks).
    """
    phy2log, log2phy, logcnt = placement
    ep, slots = len(x_per_rank), phy2log.numel()
    per = slots // ep
    sent = [pack(x, ids, log2phy, logcnt, ep, slots, r, quant) for r, (x, ids) in enumerate(zip(x_per_rank, ids_per_rank))]
    tok = [s["tok_counts"].tolist() for s in sent]
    rte = [s["route_counts"].tolist() for s in sent]
    payload = list(zip(*[_sim_a2a([s["payload"][i] for s in sent], tok) for i in range(len(sent[0]["payload"]))]))
    meta = _sim_a2a([s["meta"] for s in sent], rte)
    ys = []
    for r in range(ep):
        recv_tok = torch.tensor([tok[s][r] for s in range(ep)])
        recv_rte = torch.tensor([rte[s][r] for s in range(ep)])
        xr, t_idx, slot = unpack(payload[r], meta[r], recv_tok, recv_rte, x_per_rank[r].dtype, quant)
        local = [w[phy2log[r * per : (r + 1) * per]] for w in expert_weights]
        ys.append(experts_ref(xr, t_idx, slot, *local, fp8_gemms))
    back = _sim_a2a(ys, [[rte[s][r] for s in range(ep)] for r in range(ep)])
    return [
        home_sum(back[r], sent[r]["order"], w, x_per_rank[r].dtype)[0] for r, w in enumerate(weights_per_rank)
    ]


# ---- costs --------------------------------------------------------------------------------------------


def _nodes(ep: int, gpus_per_node: int) -> int:
    """Nodes an EP group of ep consecutive ranks spans."""
    return -(-ep // max(1, gpus_per_node))


def two_hop_bytes(tokens: int, payload: int, ep: int, gpus_per_node: int, exp_nodes: float, exp_gpus: float):
    """(IB, NVLink) bytes of a two-hop transfer of one payload per (token, distinct target GPU).

    A token crosses IB once per target node other than its own (to the GPU with its local index there):
    E[nodes] · (1 − 1/N) per token, N the nodes of the group (its own node is among the targets with
    probability E[nodes]/N by symmetry). On the target node it goes over NVLink to each GPU that holds
    its experts except the landing GPU: E[gpus] · (1 − 1/G) per token, G = GPUs per node in the group
    (the same count covers the home node, where the token starts on its own GPU).
    """
    if ep <= 1:
        return 0, 0
    n, g = _nodes(ep, gpus_per_node), min(ep, gpus_per_node)
    ib = tokens * payload * exp_nodes * (1 - 1 / n) if n > 1 else 0.0
    nvlink = tokens * payload * exp_gpus * (1 - 1 / g) if g > 1 else 0.0
    return int(ib), int(nvlink)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, Tensor) else 0


def cost_ep_dispatch(args, out) -> dict:
    """Dispatch: FP8 codes + float32 1x128 scales (or x's dtype) per (token, distinct target GPU), two-hop."""
    x, ids = args[0], args[1]
    ep, quant, gpn, exp_nodes, exp_gpus = args[5], args[7], args[8], args[9], args[10]
    t, d = x.shape
    payload = d + 4 * math.ceil(d / 128) if quant else d * x.element_size()
    ib, nvlink = two_hop_bytes(t, payload, ep, gpn, exp_nodes, exp_gpus)
    quant_flops = 3 * t * d if quant else 0
    return {"flops": quant_flops, "bwd_flops": t * d, "bytes": _nbytes(x) + _nbytes(ids) + t * exp_gpus * payload,
            "ib_bytes": ib, "nvlink_bytes": nvlink, "kernel": "dispatch", "shape": (t, payload, ep, gpn)}  # fmt: skip


def _touched_slots(recv_x, recv_tok, slots: int, ep: int) -> float:
    """Local slots a step can touch: the distinct experts ep·T tokens routed k-of-(ep·S) hit, per rank (≤ min(S, T·k))."""
    tokens = recv_x.shape[0]  # ep·T
    k = recv_tok.shape[0] // max(1, tokens)
    return expected_experts_hit(tokens, slots * max(1, ep), k) / max(1, ep)


def cost_ep_experts(args, out, local_weights=None) -> dict:
    """Local grouped SwiGLU: T·k routes expected per rank (balanced load), 3 GEMMs each; the weights (and scales)
    of the local slots the step can touch only, as for the unpartitioned experts."""
    recv_x, recv_tok, w_gate, ep = args[0], args[1], args[3], args[-1]
    d = recv_x.shape[1]
    slots, f, _ = w_gate.shape
    routes = recv_tok.shape[0] // max(1, ep)  # the padded buffer holds ep·T·k; T·k arrive on average
    flops = routes * 3 * 2 * d * f
    per_slot = sum(_nbytes(w) for w in (local_weights or args[3:6])) / slots
    weight_bytes = int(_touched_slots(recv_x, recv_tok, slots, ep) * per_slot)
    act_bytes = routes * d * (recv_x.element_size() + out.element_size())
    # priced as `routes` tokens each routed to one of the rank's `slots` experts
    return {"flops": flops, "bwd_flops": 2 * flops, "bytes": weight_bytes + act_bytes, "ib_bytes": 0, "nvlink_bytes": 0,
            "kernel": "experts", "dtype": "fp8" if args[6] is True else "bf16", "shape": (routes, 1, slots, f, d),
            "weight_bytes": weight_bytes, "wgrad_flops": flops}


def cost_ep_experts_fp8(args, out) -> dict:
    """As cost_ep_experts, over E4M3 weights (1 byte each) plus their float32 block scales; inference only."""
    c = cost_ep_experts(list(args), out, local_weights=args[3:9])
    return {**c, "bwd_flops": 0, "wgrad_flops": 0, "dtype": "fp8"}


def cost_ep_combine(args, out) -> dict:
    """Combine: one row per route back to its home rank in y's dtype (BF16 under FP8), two-hop; k FMAs per element.

    The home rank applies the routing weights, so every route's row travels (the IB/NVLink split is
    two_hop_bytes with k targets per token); summing a token's routes per node before IB, as DeepEP
    does with the weights sent along, would cut this to dispatch's counts.
    """
    y, weights, ep, gpn = args[0], args[1], args[4], args[5]
    t, k, d = weights.shape[0], weights.shape[1], y.shape[1]
    row = d * y.element_size()
    ib, nvlink = two_hop_bytes(t, row, ep, gpn, float(k), float(k))
    return {"flops": 2 * t * k * d, "bwd_flops": 4 * t * k * d, "bytes": _nbytes(out) + t * k * row,
            "ib_bytes": ib, "nvlink_bytes": nvlink, "kernel": "combine", "shape": (t, row, ep, gpn)}  # fmt: skip


def _record_cost(fn):
    """A record cost function (args..., out) → Cost from a cost_<op>(args, out) → dict."""
    return lambda *args: Cost(**fn(list(args[:-1]), args[-1]))


_COLLECTIVE = NotLowered("a collective: all_to_all_single on the EP process group (NCCL on GPUs), no Triton kernel")
_STAGE = "expert_partition"
_KERNELS = "dsv3c.codegen.kernels.grouped_fp8_gemm"
define(ep_dispatch, cost=_record_cost(cost_ep_dispatch), stage=_STAGE, lowering=_COLLECTIVE,
       autograd=(_dispatch_backward, _dispatch_setup))
define(ep_experts, cost=_record_cost(cost_ep_experts), autograd=6, stage=_STAGE,
       lowering=Lowering.of(_KERNELS, "ep_experts",
                            partial="BF16 expert GEMMs (fp8_gemms false) have no grouped-GEMM kernel; they run as torch"))
define(ep_experts_fp8, cost=_record_cost(cost_ep_experts_fp8), stage=_STAGE,
       lowering=Lowering.of(_KERNELS, "ep_experts_fp8"))
define(ep_combine, cost=_record_cost(cost_ep_combine), stage=_STAGE, lowering=_COLLECTIVE,
       autograd=(_combine_backward, _combine_setup))

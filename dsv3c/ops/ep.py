"""Expert-parallel ops: dispatch → local grouped experts → combine, over a torch.distributed EP group.

One rank-parametric SPMD program: every EP rank runs the same graph on its own micro-batch of tokens
x [T, D]; the layer's placement tables (phy2log [P], log2phy [E, R] padded -1, logcnt [E]; slots
numbered GPU-major, rank r holds slots r·S .. r·S+S−1 with S = P / ep) are graph inputs, so which
logical experts a rank holds is bound at run time (as DeepSeek's model.py binds `rank * n_local_experts`).

The route (DeepEP's layout): each (token, k) pair goes to a physical slot (replica `(rank·T + t) mod
logcnt[e]` of its logical expert e); a token travels ONCE to each GPU holding one of its experts. The
active EP context (`dsv3c.ops.ep_context`) says how: "direct", one all-to-all over the EP group, or
"two-hop", an all-to-all over IB to the GPU with the sender's local index on each target node (a token
crosses IB once per node), then over NVLink inside that node to the GPUs holding its experts. Every hop
exchanges its counts first ([peers, 2] ints), then the per-route metadata, then the rows, into receive
buffers of exactly the exchanged counts. Combine is the reverse with reductions: each expert GPU sums
its routes of a token (g·y, the routing weights sent along first), the forwarding GPU of two-hop sums
its node's rows of a token (DeepEP's per-node reduction), the home rank sums the rest; sums in float32,
rows on the wire in y's dtype (BF16 under the FP8 recipe). Where DeepEP's dispatch returns a handle that
combine reuses, combine and the backwards here re-derive the route from their inputs (counts and
route_order give every route's destination) with one metadata round per hop (ints, no rows): the ops stay
functions of their arguments, whatever calls them in whatever order.

- `ep_dispatch(x, ids, phy2log, log2phy, logcnt, ep, layer, quant, gpus_per_node, exp_nodes, exp_gpus)`:
  with `quant` the rows travel as E4M3 codes plus 1x128 float32 scales (`dsv3c.ops.fp8.act_quant`),
  forwarded as codes, dequantised on arrival: the FP8 expert GEMM re-quantises them with the same 1x128
  tiles, which reproduces the codes exactly, so "dequantise on arrival" costs no accuracy against carrying
  codes into the GEMM. Without `quant` the rows travel in x's dtype.
  Outputs, padded to the static shapes a captured graph needs (ep·T tokens and ep·T·k routes are the most
  a rank can receive when every rank has T tokens; an eager caller whose ranks hold different token
  counts gets exactly what arrived when that is more): recv_x [ep·T, D], recv_tok [ep·T·k] (row of
  recv_x, -1 = padding), recv_slot [ep·T·k] (local slot, -1 = padding), counts [4, ep] (per EP peer:
  tokens sent / received, routes sent / received), route_order [T·k] (this rank's flat (t, j) routes
  ordered by destination rank), send_tok [ep·T] (token sent per row of the first hop, -1 = padding).
- `ep_experts(recv_x, recv_tok, recv_slot, w_gate [S, F, D], w_up, w_down, fp8, ep)`: SwiGLU per received
  route with the rank's local expert weights, all local slots in one grouped (batched) GEMM per
  projection (`fp8`: every GEMM a `dsv3.fp8_linear`, as in `moe_experts_fp8_train`, per slot: the FP8
  Dgrad/Wgrad recipe has no grouped reference) → per-route outputs y [ep·T·k, D] (BF16 under fp8, else
  x's dtype). `ep_experts_fp8` is the inference variant over E4M3 weights and their 128x128 block scales
  (one grouped FP8 GEMM per projection; lowered to the Triton grouped kernel).
- `ep_combine(y, weights, counts, route_order, ep, gpus_per_node, out_dtype, exp_nodes, exp_gpus)`:
  Σ_j g[t, j]·y[t, j] at every token's home rank, by the reductions above.

Autograd is explicit: dispatch's backward reduces the gradients of the received tokens back to their home
ranks (combine direction, float32 sums); combine's backward broadcasts the output gradient to the expert
GPUs (dispatch direction), computes dy = g·dout there and dg = <y, dout>, and returns dg per route.
Gradients travel in the forward dtype. A backward runs with the EP context active where it runs (its
groups), the route from its forward.

With no EP context active the ops run on one rank: ep must be 1 and every exchange is the identity.
`simulate_ep` runs the same ops for all ranks in one process (ranks as threads, `LocalExchange`).

Each op has a `cost_<op>(args, out) -> dict` (flops, bwd_flops, bytes, ib_bytes, nvlink_bytes) over
its argument meta values in schema order: expected rows, not the padding. `ep`, `gpus_per_node` and the
expected distinct nodes / GPUs per token (`exp_nodes`, `exp_gpus`, computed by expert_partition from the
placement) are op arguments so that the costs need no data; `layer` (the MoE layer's index in graph
order) keys the observed loads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from dsv3c.ops import fp8, ref
from dsv3c.ops.ep_context import EPContext, active, current
from dsv3c.ops.record import Cost, Lowering, NotLowered, define, expected_experts_hit

# ---- the route ----------------------------------------------------------------------------------------


def route_slots(ids: Tensor, log2phy: Tensor, logcnt: Tensor, ep: int, slots: int, rank: int):
    """(destination rank, local slot) of every route (t, j): replica (rank·T + t) mod logcnt of expert ids[t, j]."""
    t = ids.shape[0]
    per_rank = slots // ep
    token = rank * t + torch.arange(t, device=ids.device)[:, None]
    replica = token % logcnt[ids]
    slot = log2phy[ids, replica]
    return slot // per_rank, slot % per_rank


@dataclass
class Hop:
    """One all-to-all of a route: which local rows and which routes go to which peer of the hop's group."""

    name: str  # the group: "ep", "rail" or "node" (dsv3c.ops.ep_context)
    rows: int  # rows held before the hop (a rank's tokens, or the tokens that landed on a forwarding GPU)
    tok_idx: Tensor  # the local rows sent, grouped by peer (each row once per peer)
    tok_send: list
    tok_recv: list
    rt_idx: Tensor  # the local routes in send order, grouped by peer (a permutation)
    rt_send: list
    rt_recv: list


@dataclass
class Route:
    """Where a dispatch sent one rank's tokens; per route at its expert GPU: row of the received tokens, local
    slot, originating EP rank."""

    hops: list
    row: Tensor
    slot: Tensor
    src: Tensor

    @property
    def rows(self) -> int:
        """Tokens this rank received (distinct (token, this GPU) pairs)."""
        return sum(self.hops[-1].tok_recv)

    def broadcast(self, ctx: EPContext, t: Tensor, name: str) -> Tensor:
        """Rows of the home tokens t [T, ...] at the expert GPUs: one per (token, GPU), forwarded hop by hop."""
        for h in self.hops:
            t = ctx.all_to_all(t[h.tok_idx], h.tok_send, h.tok_recv, h.name, name)
        return t

    def reduce(self, ctx: EPContext, t: Tensor, wire, name: str) -> Tensor:
        """Float32 [T, ...] at home: the rows t held per (token, GPU) summed back hop by hop (rows travel in wire)."""
        acc = t.float()
        for h in reversed(self.hops):
            back = ctx.all_to_all(acc.to(wire), h.tok_recv, h.tok_send, h.name, name)
            acc = torch.zeros((h.rows, *t.shape[1:]), dtype=torch.float32, device=t.device)
            acc.index_add_(0, h.tok_idx, back.float())
        return acc

    def move(self, ctx: EPContext, v: Tensor, name: str) -> Tensor:
        """Per-route values v [T·k, ...] (flat (t, j) order) at the routes' expert GPUs, in `row`/`slot` order."""
        for h in self.hops:
            v = ctx.all_to_all(v[h.rt_idx], h.rt_send, h.rt_recv, h.name, name)
        return v

    def back(self, ctx: EPContext, v: Tensor, name: str) -> Tensor:
        """The inverse of move: per-route values at the expert GPUs back at home in flat (t, j) order."""
        for h in reversed(self.hops):
            got = ctx.all_to_all(v, h.rt_recv, h.rt_send, h.name, name)
            v = torch.empty_like(got)
            v[h.rt_idx] = got
        return v


def _plan_hop(ctx: EPContext, hop: str, rows: int, route_row: Tensor, route_peer: Tensor, extra: Tensor):
    """Exchange counts and route metadata for one hop: (Hop, each received route's row there, its extra columns)."""
    peers, dev = ctx.hop_size(hop), route_row.device
    hit = torch.zeros(rows, peers, dtype=torch.bool, device=dev)
    hit[route_row, route_peer] = True
    pairs = hit.t().nonzero()  # (peer, row), peer-major
    pos = hit.long().cumsum(0) - 1  # pos[r, p]: the place of row r in the block sent to peer p
    rt_idx = torch.argsort(route_peer, stable=True)
    rt_send = torch.bincount(route_peer, minlength=peers)
    counts = ctx.all_to_all(torch.stack([hit.sum(0), rt_send], 1), [1] * peers, [1] * peers, hop, "route counts")
    meta = torch.cat([pos[route_row, route_peer][:, None], extra], 1)[rt_idx]
    meta = ctx.all_to_all(meta, rt_send.tolist(), counts[:, 1].tolist(), hop, "route metadata")
    offset = torch.cumsum(counts[:, 0], 0) - counts[:, 0]
    block = torch.repeat_interleave(torch.arange(peers, device=dev), counts[:, 1])
    h = Hop(hop, rows, pairs[:, 1], hit.sum(0).tolist(), counts[:, 0].tolist(), rt_idx, rt_send.tolist(),
            counts[:, 1].tolist())
    return h, meta[:, 0] + offset[block], meta[:, 1:]


def plan_route(ctx: EPContext, dst: Tensor, slot: Tensor, tokens: int) -> Route:
    """The route of this rank's routes (flat (t, j): destination EP rank dst, local slot) under ctx's route kind."""
    k = dst.numel() // max(1, tokens)
    home = torch.arange(dst.numel(), device=dst.device) // max(1, k)
    src = torch.full_like(dst, ctx.rank)
    if ctx.route == "direct":
        h, row, extra = _plan_hop(ctx, "ep", tokens, home, dst, torch.stack([slot, src], 1))
        return Route([h], row, extra[:, 0], extra[:, 1])
    g = ctx.gpus_per_node
    h1, row, extra = _plan_hop(ctx, "rail", tokens, home, dst // g, torch.stack([dst % g, slot, src], 1))
    h2, row, extra = _plan_hop(ctx, "node", sum(h1.tok_recv), row, extra[:, 0], extra[:, 1:])
    return Route([h1, h2], row, extra[:, 0], extra[:, 1])


# ---- contexts -----------------------------------------------------------------------------------------

_SINGLE = threading.local()


def _context(ep: int) -> EPContext:
    """The active EP context (checked against ep), or this thread's single-rank context when ep == 1."""
    ctx = current()
    if ctx is None:
        if ep != 1:
            raise RuntimeError(f"the EP ops were built for ep={ep} but no EP group is active (dsv3c.ops.ep_context)")
        if not hasattr(_SINGLE, "ctx"):
            _SINGLE.ctx = EPContext(rank=0, size=1)
        return _SINGLE.ctx
    if ctx.size != ep:
        raise RuntimeError(f"the EP ops were built for ep={ep} but the active EP group has {ctx.size} ranks")
    return ctx


def route_of(ctx: EPContext, counts: Tensor, route_order: Tensor, tokens: int) -> Route:
    """The route a dispatch took, from its outputs: every route's destination (counts' routes per peer in
    route_order) planned again (one metadata round per hop)."""
    dst = torch.empty_like(route_order)
    dst[route_order] = torch.repeat_interleave(torch.arange(ctx.size, device=counts.device), counts[2])
    return plan_route(ctx, dst, torch.zeros_like(dst), tokens)


def _pad(t: Tensor, rows: int, fill) -> Tensor:
    """t padded with `fill` rows to `rows` rows."""
    out = t.new_full((rows, *t.shape[1:]), fill)
    out[: t.shape[0]] = t
    return out


def _counts(ctx: EPContext, route: Route, dst: Tensor, tokens: int) -> Tensor:
    """[4, ep]: per EP peer tokens sent / received, routes sent / received."""
    ep, dev = ctx.size, dst.device
    home = torch.arange(dst.numel(), device=dev) // max(1, dst.numel() // max(1, tokens))
    sent = torch.zeros(tokens, ep, dtype=torch.bool, device=dev)
    sent[home, dst] = True
    got = torch.zeros(route.rows, ep, dtype=torch.bool, device=dev)
    got[route.row, route.src] = True
    return torch.stack([sent.sum(0), got.sum(0), torch.bincount(dst, minlength=ep), torch.bincount(route.src, minlength=ep)])


# ---- ep_dispatch ------------------------------------------------------------------------------------


@torch.library.custom_op("dsv3::ep_dispatch", mutates_args=())
def ep_dispatch(
    x: Tensor, ids: Tensor, phy2log: Tensor, log2phy: Tensor, logcnt: Tensor, ep: int, layer: int, quant: bool,
    gpus_per_node: int, exp_nodes: float, exp_gpus: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Send this rank's tokens x [T, D] to the EP ranks holding their routed experts (FP8 + 1x128 scales if quant)."""
    ctx = _context(ep)
    t, k = ids.shape
    dst, slot = route_slots(ids, log2phy, logcnt, ep, phy2log.numel(), ctx.rank)
    if ctx.observe:
        _observe(ctx, layer, ids, dst, logcnt.numel())
    route = plan_route(ctx, dst.reshape(-1), slot.reshape(-1), t)
    if quant:  # one row of bytes per token: its E4M3 codes, then its float32 1x128 scales
        codes, scales = fp8.act_quant(x)
        rows = route.broadcast(ctx, torch.cat([codes.view(torch.uint8), scales.view(torch.uint8)], 1), "dispatch")
        d = x.shape[1]
        xr = fp8.act_dequant(rows[:, :d].view(fp8.FP8), rows[:, d:].contiguous().view(torch.float32)).to(x.dtype)
    else:
        xr = route.broadcast(ctx, x, "dispatch")
    if ctx.observe:
        ctx.received_tokens += xr.shape[0]
        ctx.token_capacity += ep * t
        for h in route.hops:
            ctx.sent_rows[h.name] += sum(h.tok_send) - h.tok_send[ctx.hop_rank(h.name)]
    rows, routes = max(ep * t, xr.shape[0]), max(ep * t * k, route.row.numel())
    flat = dst.reshape(-1)
    return (
        _pad(xr, rows, 0), _pad(route.row, routes, -1), _pad(route.slot, routes, -1), _counts(ctx, route, flat, t),
        torch.argsort(flat, stable=True), _pad(route.hops[0].tok_idx, ep * t, -1),
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
        hit = torch.zeros(dst.shape[0], int(where.max()) + 1, dtype=torch.bool, device=dst.device)
        distinct = hit.scatter_(1, where, True).sum(1)
        setattr(ctx, attr, max(getattr(ctx, attr), int(distinct.max()) if distinct.numel() else 0))


def _dispatch_setup(ctx, inputs, output):
    x, ep = inputs[0], inputs[5]
    ctx.ep, ctx.dtype, ctx.tokens = ep, x.dtype, x.shape[0]
    ctx.save_for_backward(output[3], output[4])


def _dispatch_backward(ctx, grad_x, *_):
    if grad_x is None:
        return (None, *[None] * 10)
    ep_ctx = _context(ctx.ep)
    route = route_of(ep_ctx, *ctx.saved_tensors, ctx.tokens)
    grad = route.reduce(ep_ctx, grad_x[: route.rows], ctx.dtype, "dispatch backward")
    return (grad.to(ctx.dtype), *[None] * 10)


# ---- ep_experts -------------------------------------------------------------------------------------


def _by_slot(recv_slot: Tensor, slots: int):
    """(the received routes grouped by local slot, padding left out; routes per slot)."""
    idx = (recv_slot >= 0).nonzero().squeeze(-1)
    order = idx[torch.argsort(recv_slot[idx], stable=True)]
    return order, torch.bincount(recv_slot[idx], minlength=slots)


def grouped_linear(x: Tensor, counts: Tensor, w: Tensor) -> Tensor:
    """Rows of x grouped by expert (counts[e] rows each, in order) times w[e]ᵀ [N, K]: one batched GEMM over the
    experts, each padded to the busiest one."""
    s = w.shape[0]
    if x.shape[0] == 0:
        return x.new_zeros((0, w.shape[1]))
    expert = torch.repeat_interleave(torch.arange(s, device=x.device), counts)
    pos = torch.arange(x.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[expert]
    batch = x.new_zeros((s, int(counts.max()), x.shape[1])).index_put((expert, pos), x)
    return torch.bmm(w, batch.transpose(1, 2)).transpose(1, 2)[expert, pos]  # (w·xᵀ)ᵀ: w's gradient stays contiguous


def experts_ref(recv_x, recv_tok, recv_slot, w_gate, w_up, w_down, fp8_gemms: bool, ep: int = 1) -> Tensor:
    """Per-route SwiGLU outputs y[i] = FFN_{slot[i]}(x[tok[i]]) (zeros on padding), the local slots grouped."""
    out_dtype = torch.bfloat16 if fp8_gemms else recv_x.dtype
    order, counts = _by_slot(recv_slot, w_gate.shape[0])
    xe = recv_x[recv_tok[order]]
    if fp8_gemms:
        lin = torch.ops.dsv3.fp8_linear
        parts = []
        for s, xs in enumerate(xe.split(counts.tolist())):
            if xs.shape[0]:
                parts.append(lin(ref.swiglu(lin(xs, w_gate[s]), lin(xs, w_up[s])), w_down[s]))
        h = torch.cat(parts) if parts else xe.new_zeros((0, recv_x.shape[1]))
    else:
        h = grouped_linear(ref.swiglu(grouped_linear(xe, counts, w_gate), grouped_linear(xe, counts, w_up)), counts,
                           w_down)  # fmt: skip
    y = torch.zeros(recv_tok.shape[0], recv_x.shape[1], dtype=out_dtype, device=recv_x.device)
    return y.index_copy(0, order, h.to(out_dtype))


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
    """Inference variant: E4M3 local weights with 128x128 block scales, activations quantised per GEMM, one grouped
    FP8 GEMM per projection over the routes sorted by slot."""
    order, counts = _by_slot(recv_slot, gq.shape[0])
    offsets = torch.zeros(gq.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0).cpu()

    def gemm(a, wq, ws):
        aq, a_s = fp8.act_quant(a)
        return fp8.grouped_fp8_gemm(aq, a_s, wq, ws, offsets, torch.bfloat16)

    xe = recv_x[recv_tok[order]]
    y = torch.zeros(recv_tok.shape[0], recv_x.shape[1], dtype=torch.bfloat16, device=recv_x.device)
    y[order] = gemm(ref.swiglu(gemm(xe, gq, gs), gemm(xe, uq, us)), dq, ds).to(y.device)
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
    y: Tensor, weights: Tensor, counts: Tensor, route_order: Tensor, ep: int, gpus_per_node: int, out_dtype: torch.dtype,
    exp_nodes: float, exp_gpus: float,
) -> Tensor:
    """Σ_j g[t, j]·y[t, j] at every token's home rank [T, D]: summed per expert GPU, per node (two-hop), at home."""
    ctx = _context(ep)
    route = route_of(ctx, counts, route_order, weights.shape[0])
    w = route.move(ctx, weights.reshape(-1, 1).float(), "combine weights")
    partial = torch.zeros(route.rows, y.shape[1], dtype=torch.float32, device=y.device)
    partial.index_add_(0, route.row, y[: route.row.numel()].float() * w)
    return route.reduce(ctx, partial, y.dtype, "combine").to(out_dtype)


@ep_combine.register_fake
def _(y, weights, counts, route_order, ep, gpus_per_node, out_dtype, exp_nodes, exp_gpus):
    return y.new_empty((weights.shape[0], y.shape[1]), dtype=out_dtype)


def _combine_setup(ctx, inputs, output):
    y, weights, counts, order, ep = inputs[:5]
    ctx.ep = ep
    ctx.save_for_backward(y, weights, counts, order)


def _combine_backward(ctx, grad_out):
    y, weights, counts, order = ctx.saved_tensors
    ep_ctx = _context(ctx.ep)
    route = route_of(ep_ctx, counts, order, weights.shape[0])
    n = route.row.numel()
    w = route.move(ep_ctx, weights.reshape(-1, 1).float(), "combine backward weights")
    g = route.broadcast(ep_ctx, grad_out.to(y.dtype), "combine backward")[route.row].float()
    grad_y = torch.zeros_like(y)
    grad_y[:n] = (w * g).to(y.dtype)
    grad_w = route.back(ep_ctx, (y[:n].float() * g).sum(-1, keepdim=True), "combine backward weight grads")
    return grad_y, grad_w.reshape(weights.shape).to(weights.dtype), *[None] * 7


# ---- all ranks in one process ------------------------------------------------------------------------


class LocalExchange:
    """all_to_all among EP ranks that are threads of one process (every rank calls every exchange in the same order)."""

    def __init__(self, size: int):
        self.barrier = threading.Barrier(size)
        self.box: dict = {}

    def all_to_all(self, ctx: EPContext, t: Tensor, send: list[int], recv: list[int], hop: str) -> Tensor:
        """What this rank receives when every member of its hop group sends its rows t split by send."""
        members = ctx.hop_members(hop)
        self.box[ctx.rank] = t.split(send)
        self.barrier.wait()
        out = torch.cat([self.box[src][members.index(ctx.rank)] for src in members])
        self.barrier.wait()  # every rank has read before the next exchange overwrites the box
        assert out.shape[0] == sum(recv)
        return out


def run_ranks(fn, ep: int, gpus_per_node: int | None = None, route: str = "direct") -> list:
    """fn(rank) on ep threads, each with an EPContext over a LocalExchange; the results in rank order."""
    comm, results, errors = LocalExchange(ep), [None] * ep, []

    def body(rank):
        ctx = EPContext(rank=rank, size=ep, gpus_per_node=gpus_per_node or ep, route=route, comm=comm)
        try:
            with active(ctx):
                results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001  (re-raised below; the others must not wait forever)
            errors.append(e)
            comm.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(ep)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


def simulate_ep(x_per_rank, ids_per_rank, weights_per_rank, placement, expert_weights, quant: bool = False,
                fp8_gemms: bool = False, gpus_per_node: int | None = None, route: str = "direct") -> list[Tensor]:  # fmt: skip
    """What all EP ranks together compute for one MoE layer: each rank's routed-expert output [T, D].

    placement = (phy2log [P], log2phy [E, R], logcnt [E]); expert_weights = (w_gate, w_up, w_down) over
    logical experts [E, ...]; rank r binds slots r·S .. r·S+S−1 (S = P / ranks). The ranks run the dsv3 ops
    themselves, as threads exchanging rows in process.
    """
    import dsv3c.ops  # noqa: F401  (registers torch.ops.dsv3)

    phy2log, log2phy, logcnt = placement
    ep = len(x_per_rank)
    per = phy2log.numel() // ep
    ops = torch.ops.dsv3

    def rank_fn(r):
        x, ids = x_per_rank[r], ids_per_rank[r]
        recv_x, tok, slot, counts, order, _ = ops.ep_dispatch(x, ids, phy2log, log2phy, logcnt, ep, 0, quant,
                                                              gpus_per_node or ep, 1.0, 1.0)  # fmt: skip
        local = [w[phy2log[r * per : (r + 1) * per]] for w in expert_weights]
        y = ops.ep_experts(recv_x, tok, slot, *local, fp8_gemms, ep)
        return ops.ep_combine(y, weights_per_rank[r], counts, order, ep, gpus_per_node or ep, x.dtype, 1.0, 1.0)

    return run_ranks(rank_fn, ep, gpus_per_node, route)


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
    """Combine: dispatch's transfer reversed, a row in y's dtype (BF16 under FP8) per (token, target GPU) over
    NVLink and per (token, other target node) over IB (each expert GPU sums its routes of a token, each
    forwarding GPU its node's rows: two_hop_bytes with dispatch's expected nodes and GPUs per token); k FMAs
    per element. The routing weights sent ahead (k floats per token) are left out: under 0.1% of the rows."""
    y, weights, ep, gpn, exp_nodes, exp_gpus = args[0], args[1], args[4], args[5], args[7], args[8]
    t, k, d = weights.shape[0], weights.shape[1], y.shape[1]
    row = d * y.element_size()
    ib, nvlink = two_hop_bytes(t, row, ep, gpn, exp_nodes, exp_gpus)
    return {"flops": 2 * t * k * d, "bwd_flops": 4 * t * k * d, "bytes": _nbytes(out) + int(t * exp_gpus * row),
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

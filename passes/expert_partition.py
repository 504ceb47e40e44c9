"""expert_partition: the routed experts spread over EP ranks — gate → dispatch → local grouped GEMM → combine.

Every `moe_experts` / `moe_experts_fp8_train` / `moe_experts_fp8` node becomes

    ep_dispatch(x, ids, phy2log, log2phy, logcnt, ...)   tokens to the ranks holding their experts
    ep_experts(recv_x, recv_tok, recv_slot, w_gate_local [S, F, D], ...)   (ep_experts_fp8 for E4M3 weights)
    ep_combine(y, weights, counts, route_order, ...)     outputs home, Σ_j g·y (float32 sums, per GPU and node)

The program stays ONE rank-parametric SPMD graph: the local expert weights are new placeholders of
shape [S, ...] (S = slots per rank) holding rank 0's binding; the runtime binds rank r's slots
r·S .. r·S+S−1 from the placement (`program.ep` records, per layer, the tables and which
stacked weight each local placeholder is cut from). The placement tables are int64 weights of the graph.

The layout comes from the Plan's `parallel` analysis (the ParallelPlan): the EP degree, GPUs per node
and the placement (per MoE layer in graph order, MTP last: phy2log [L, P], log2phy [L, E, R], logcnt
[L, E] as `dsv3c.eplb.rebalance_experts` returns them; none: contiguous, no replicas). EP rank r sits
on node r // gpus_per_node.

Node-limited routing, proven from the placement where the config has it (n_group > 1 groups of which a
token keeps topk_group < n_group): the nodes a token can reach are the union of its groups' node sets
(an expert's node set = the nodes of all its replicas). The pass takes the maximum of that union over
all choices of topk_group groups; when EP spans more than one node it must be <= topk_group, else
PartitionError (train and prefill). Without groups (n_group 1, as in Kimi-K2 and Moonlight) there is no
limit to prove: the stats record `node_limited` false. Either way the expected distinct nodes / GPUs a
token's top-k reach under the placement (`dsv3c.placement.expected_fanout`) feed the dispatch cost.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

import dsv3c.ops  # noqa: F401  (registers torch.ops.dsv3)
from dsv3c.eplb import contiguous_phy2log, inverse_tables
from dsv3c.placement import ExpertPlacement, expected_fanout, max_nodes_per_token_bound, node_limited
from dsv3c.ir import Plan, Program, layer_of
from passes.registry import register

dsv3 = torch.ops.dsv3
EXPERT_OPS = ("moe_experts", "moe_experts_fp8_train", "moe_experts_fp8")


class PartitionError(ValueError):
    """An EP degree, placement or node size the model's experts cannot be partitioned with."""


def layer_tables(placement, index: int, key: str, experts: int):
    """The (phy2log [P], log2phy [E, R], logcnt [E]) of MoE layer number `index` (named `key`) of a stacked placement
    (None: contiguous, no replicas)."""
    if placement is None:
        phy2log = contiguous_phy2log(1, experts)
        return (phy2log[0], *(t[0] for t in inverse_tables(phy2log, experts)))
    if index >= placement[0].shape[0]:
        raise PartitionError(f"placement covers {placement[0].shape[0]} MoE layers; the graph has more ({key})")
    return tuple(torch.as_tensor(t[index], dtype=torch.long) for t in placement)


def check_tables(phy2log, log2phy, logcnt, experts: int, ep: int) -> int:
    """Slots per rank S; PartitionError unless the tables describe a valid placement of `experts` on ep ranks."""
    slots = phy2log.numel()
    if ep < 1 or slots % ep:
        raise PartitionError(f"EP {ep} does not divide the {slots} expert slots ({experts} experts + {slots - experts} redundant)")
    if phy2log.dim() != 1 or phy2log.min() < 0 or phy2log.max() >= experts:
        raise PartitionError(f"phy2log must map each of the {slots} slots to one of {experts} experts")
    count = torch.bincount(phy2log, minlength=experts)
    if (count == 0).any():
        raise PartitionError(f"expert {int((count == 0).nonzero()[0])} has no slot in the placement")
    if not torch.equal(count, logcnt.reshape(-1)):
        raise PartitionError("logcnt does not match the replica counts of phy2log")
    for e in range(experts):
        reps = log2phy[e, : int(count[e])]
        if (reps < 0).any() or not torch.equal(phy2log[reps], torch.full_like(reps, e)):
            raise PartitionError(f"log2phy of expert {e} does not list its slots")
    return slots // ep


def layer_placement(tables, ep: int, gpus_per_node: int) -> ExpertPlacement:
    """One MoE layer's (phy2log, log2phy, logcnt) as an ExpertPlacement over ep ranks in nodes of gpus_per_node."""
    gpn = min(gpus_per_node, ep)
    if ep % gpn:
        raise PartitionError(f"EP {ep} is not whole nodes of {gpus_per_node} GPUs")
    phy2log, log2phy, logcnt = tables
    return ExpertPlacement(ep, gpn, phy2log[None], log2phy[None], logcnt.reshape(1, -1))


def _gate_args(program: Program, node: fx.Node) -> tuple[int, int, int]:
    """(n_group, topk_group, top_k) of the gate feeding an experts node (from the config if not traceable)."""
    ids = node.args[1]
    if ids.target is operator.getitem and getattr(ids.args[0], "target", None) is dsv3.moe_gate.default:
        gate = ids.args[0]
        return gate.args[3], gate.args[4], gate.args[5]
    cfg = program.cfg
    return cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok


def _local_weight(program: Program, cache: dict, source: fx.Node, phy2log: fx.Node, per_rank: int,
                  key: str) -> fx.Node:
    """A placeholder [S, ...] for rank 0's slots of a stacked expert weight (real or meta)."""
    if source.op != "placeholder" or source.name not in program.weights:
        raise PartitionError(f"expert weight {source.name} of {key} is not a weight placeholder")
    if source.name not in cache:
        full = program.weights[source.name]

        def local(_, stacked, slots):
            return stacked[slots[:per_rank]].clone()

        if full.is_meta:
            value = torch.empty((per_rank, *full.shape[1:]), dtype=full.dtype, device="meta")
        else:
            value = local(None, full, program.weights[phy2log.name])
        cache[source.name] = program.add_weight(f"{source.name}_ep_local", value, (local, [source, phy2log]))
    return cache[source.name]


def _rewrite(program: Program, node: fx.Node, index: int, key: str, tables, ep: int, gpn: int, estimates):
    """Replace one experts node by dispatch → local experts → combine: (what the runtime binds, (dispatch, combine))."""
    kind = dsv3c.ops.op_name(node.target)
    x, ids, weights = node.args[:3]
    stacked = node.args[3:]
    per_rank = tables[0].numel() // ep
    stem = key.replace(".", "_")
    table_nodes = [program.add_weight(f"{stem}_ep_{n}", t) for n, t in zip(("phy2log", "log2phy", "logcnt"), tables)]
    cache: dict = {}
    local = [_local_weight(program, cache, w, table_nodes[0], per_rank, key) for w in stacked]
    quant = kind != "moe_experts"
    with program.graph.inserting_before(node):
        d = program.call(
            dsv3.ep_dispatch.default, (x, ids, *table_nodes, ep, index, quant, gpn, *estimates), like=node
        )  # fmt: skip
        recv_x, recv_tok, recv_slot, counts, order, _ = (program.call(operator.getitem, (d, i), like=node) for i in range(6))
        if kind == "moe_experts_fp8":
            y = program.call(dsv3.ep_experts_fp8.default, (recv_x, recv_tok, recv_slot, *local, ep), like=node)
        else:
            fp8_gemms = kind == "moe_experts_fp8_train"
            y = program.call(dsv3.ep_experts.default, (recv_x, recv_tok, recv_slot, *local, fp8_gemms, ep), like=node)
        out = program.call(
            dsv3.ep_combine.default, (y, weights, counts, order, ep, gpn, node.meta["val"].dtype, *estimates), like=node
        )  # fmt: skip
    node.replace_all_uses_with(out)
    program.graph.erase_node(node)
    binding = {"index": index, "tables": [n.name for n in table_nodes], "bindings": {cache[s].name: s for s in cache}}
    return binding, (d, out)


_INDEX, _ESTIMATES = 6, 9  # ep_dispatch's argument positions of the layer index and the expected fan-out
_COMBINE_ESTIMATES = 7  # ep_combine's argument position of the expected fan-out


def _instance(program: Program, inst, exchange: tuple, binding: dict, index: int, tables, estimates) -> dict:
    """Attach one more MoE layer computed by the block of the (dispatch, combine) nodes `exchange` to its
    instance (its index, fan-out and placement tables); returns what the runtime binds for it."""
    blocks = program.blocks
    dispatch, combine = exchange
    args = list(dispatch.args)
    args[_INDEX], args[_ESTIMATES:] = index, list(estimates)
    blocks.set_args(inst, dispatch, tuple(args))
    args = list(combine.args)
    args[_COMBINE_ESTIMATES:] = list(estimates)
    blocks.set_args(inst, combine, tuple(args))
    for name, table in zip(binding["tables"], tables):
        blocks.values[(inst.unit, name)] = table
    return {"index": index, "tables": [blocks.rename(inst, n) for n in binding["tables"]],
            "bindings": {blocks.rename(inst, loc): blocks.rename(inst, src) for loc, src in binding["bindings"].items()}}


def _layer_facts(memo: dict, tables, experts: int, ep: int, gpn: int, gate: tuple) -> tuple:
    """(slots per rank, experts per GPU, max nodes per token, expected fan-out) of one layer's tables, computed
    once per distinct tables (the layers of a contiguous placement share theirs)."""
    key = (*(t.numpy().tobytes() for t in tables), experts, ep, gpn, gate)
    if key not in memo:
        n_group, topk_group, top_k = gate
        per_rank = check_tables(*tables, experts, ep)
        place = layer_placement(tables, ep, gpn)
        bound = max_nodes_per_token_bound(place, n_group, topk_group).max
        estimates = expected_fanout(place, n_group, topk_group, top_k)
        per_gpu = [len(set(tables[0][r * per_rank : (r + 1) * per_rank].tolist())) for r in range(ep)]
        memo[key] = per_rank, max(per_gpu), bound, estimates
    return memo[key]


@register(
    "expert_partition",
    "places the routed (and redundant) experts on EP ranks, proves node-limited routing from the placement and "
    "replaces each experts op by dispatch (FP8) / local grouped GEMM / combine (BF16); one SPMD graph per rank",
    removes=list(EXPERT_OPS),
    reads=["parallel"],
    writes=["placement"],
)
def expert_partition(plan: Plan, opts: dict):
    """Partition every MoE layer's experts over the parallel plan's EP ranks; report placement and node-limit figures."""
    program = plan.program
    layout = plan.analyses.parallel
    ep, gpn = layout.mesh.ep, layout.mesh.gpus_per_node
    spans = -(-ep // gpn)
    placement = layout.tables()
    targets = [n for n in program.graph.nodes if n.op == "call_function" and dsv3c.ops.op_name(n.target) in EXPERT_OPS]
    layers, per_layer, memo, index = {}, [], {}, 0
    for node in targets:
        key = layer_of(node) or f"moe{index}"
        experts = node.args[3].meta["val"].shape[0]
        n_group, topk_group, top_k = gate = _gate_args(program, node)
        limited = node_limited(n_group, topk_group)
        exchange = binding = None
        for inst in (program.blocks.of(key) if program.blocks is not None else []) or [None]:  # each layer it computes
            unit = key if inst is None else inst.unit
            tables = layer_tables(placement, index, unit, experts)
            per_rank, per_gpu, bound, estimates = _layer_facts(memo, tables, experts, ep, gpn, gate)
            bound = min(spans, bound)
            # decode's low-latency dispatch sends each token straight to its experts' GPUs over IB (no NVLink
            # forwarding), so the node limit, which bounds the IB hops of two-hop dispatch, binds train and prefill
            if limited and spans > 1 and bound > topk_group and program.mode != "decode":
                raise PartitionError(
                    f"{unit}: with EP {ep} over {spans} nodes of {gpn} GPUs a token can reach {bound} nodes, "
                    f"more than topk_group={topk_group}; map expert groups to nodes"
                )  # fmt: skip
            if exchange is None:  # the node's own layer (a block's first instance) is rewritten in the graph
                binding, exchange = _rewrite(program, node, index, key, tables, ep, gpn, estimates)
                layers[unit] = dict(binding)
            else:
                layers[unit] = _instance(program, inst, exchange, binding, index, tables, estimates)
            layers[unit]["experts"] = experts
            per_layer.append({"layer": unit, "slots_per_gpu": per_rank, "experts_per_gpu": per_gpu,
                              "redundant_experts": tables[0].numel() - experts, "node_limited": limited,
                              "max_nodes_per_token": bound, "expected_nodes_per_token": round(estimates[0], 4),
                              "expected_gpus_per_token": round(estimates[1], 4)})  # fmt: skip
            index += 1
    program.drop_unused_weights()
    program.recompile()
    program.ep = {"ep": ep, "gpus_per_node": gpn, "layers": layers}
    plan.analyses.placement = {"ep": ep, "gpus_per_node": gpn, "layers": per_layer}
    return {
        "ep": ep,
        "nodes": spans,
        "gpus_per_node": gpn,
        "moe_layers": len(per_layer),
        "slots_per_gpu": max((p["slots_per_gpu"] for p in per_layer), default=0),
        "experts_per_gpu": max((p["experts_per_gpu"] for p in per_layer), default=0),
        "redundant_experts": sum(p["redundant_experts"] for p in per_layer),
        "max_nodes_per_token": max((p["max_nodes_per_token"] for p in per_layer), default=0),
        "node_limited": any(p["node_limited"] for p in per_layer),
        "expected_nodes_per_token": max((p["expected_nodes_per_token"] for p in per_layer), default=0),
        "expected_gpus_per_token": max((p["expected_gpus_per_token"] for p in per_layer), default=0),
        "layers": per_layer,
    }

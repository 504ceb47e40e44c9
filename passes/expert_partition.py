"""expert_partition: the routed experts spread over EP ranks — gate → dispatch → local grouped GEMM → combine.

Every `moe_experts` / `moe_experts_fp8_train` / `moe_experts_fp8` node becomes

    ep_dispatch(x, ids, phy2log, log2phy, logcnt, ...)   tokens to the ranks holding their experts
    ep_experts(recv_x, recv_tok, recv_slot, w_gate_local [S, F, D], ...)   (ep_experts_fp8 for E4M3 weights)
    ep_combine(y, weights, counts, route_order, ...)     outputs home, Σ_j g·y in float32

The program stays ONE rank-parametric SPMD graph: the local expert weights are new placeholders of
shape [S, ...] (S = slots per rank) holding rank 0's binding; the runtime binds rank r's slots
r·S .. r·S+S−1 from the placement (`program.ep` records, per layer, the tables and which
stacked weight each local placeholder is cut from). The placement tables are int64 weights of the graph.

The layout comes from the Plan's `parallel` analysis (the ParallelPlan): the EP degree, GPUs per node
and the placement (per MoE layer in graph order, MTP last: phy2log [L, P], log2phy [L, E, R], logcnt
[L, E] as `dsv3c.eplb.rebalance_experts` returns them; none: contiguous, no replicas). EP rank r sits
on node r // gpus_per_node.

Node-limited routing, proven from the placement: a token picks `topk_group` groups, so the nodes it
can reach are the union of its groups' node sets (an expert's node set = the nodes of all its
replicas). The pass takes the maximum of that union over all choices of topk_group groups (at most
the nodes of the group); when EP spans more than one node it must be <= topk_group, else
PartitionError. The expected distinct nodes / GPUs per token feed the dispatch cost (see
`expected_targets`).
"""

from __future__ import annotations

import itertools
import math
import operator

import torch
from torch import fx

import dsv3c.ops  # noqa: F401  (registers torch.ops.dsv3)
from dsv3c.eplb import contiguous_phy2log, inverse_tables
from dsv3c.placement import ExpertPlacement, max_nodes_per_token_bound
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


def max_nodes_per_token(phy2log, experts: int, n_group: int, topk_group: int, per_rank: int, gpus_per_node: int) -> int:
    """The most nodes one token can reach: max over topk_group-sets of groups of their replicas' nodes' union."""
    ranks = phy2log.numel() // per_rank
    gpn = min(gpus_per_node, ranks)
    if ranks % gpn:
        raise PartitionError(f"EP {ranks} is not whole nodes of {gpus_per_node} GPUs")
    tables = (phy2log[None], *inverse_tables(phy2log[None], experts))
    return max_nodes_per_token_bound(ExpertPlacement(ranks, gpn, *tables), n_group, topk_group).max


def expected_targets(phy2log, log2phy, experts: int, n_group: int, topk_group: int, top_k: int, per_rank: int,
                     gpus_per_node: int) -> tuple[float, float]:  # fmt: skip
    """(E[distinct nodes], E[distinct GPUs]) per token under uniform node-limited routing.

    Model: the token's topk_group groups are a uniform choice among the n_group; its top_k experts are
    a uniform choice among the m = topk_group·E/n_group experts of those groups; each expert counts at
    its first replica. A place (node or GPU) holding a of those m experts is hit with probability
    1 − C(m − a, k) / C(m, k) (hypergeometric); the expectation sums these over places and averages
    over the group choices (enumerated; sampled evenly when there are more than 2000).
    """
    size = experts // n_group
    first = log2phy[:, 0].tolist()
    gpu_of = [first[e] // per_rank for e in range(experts)]
    combos = list(itertools.combinations(range(n_group), topk_group))
    if len(combos) > 2000:
        combos = combos[:: len(combos) // 2000]
    totals = [0.0, 0.0]
    for combo in combos:
        members = [e for g in combo for e in range(g * size, (g + 1) * size)]
        m, k = len(members), min(top_k, len(members))
        for i, place in enumerate((lambda e: gpu_of[e] // gpus_per_node, lambda e: gpu_of[e])):
            counts: dict = {}
            for e in members:
                counts[place(e)] = counts.get(place(e), 0) + 1
            totals[i] += sum(1 - math.comb(m - a, k) / math.comb(m, k) for a in counts.values())
    return totals[0] / len(combos), totals[1] / len(combos)


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
    """Replace one experts node by dispatch → local experts → combine: (what the runtime binds, the dispatch node)."""
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
            dsv3.ep_combine.default, (y, weights, counts, order, ep, gpn, node.meta["val"].dtype), like=node
        )  # fmt: skip
    node.replace_all_uses_with(out)
    program.graph.erase_node(node)
    binding = {"index": index, "tables": [n.name for n in table_nodes], "bindings": {cache[s].name: s for s in cache}}
    return binding, d


def _instance(program: Program, inst, dispatch: fx.Node, binding: dict, index: int, tables, estimates) -> dict:
    """Attach one more MoE layer computed by the block of `dispatch` to its instance: its index, fan-out and tables;
    returns what the runtime binds for it."""
    blocks = program.blocks
    args = list(dispatch.args)
    args[_INDEX], args[_ESTIMATES:] = index, list(estimates)
    blocks.set_args(inst, dispatch, tuple(args))
    for name, table in zip(binding["tables"], tables):
        blocks.values[(inst.unit, name)] = table
    return {"index": index, "tables": [blocks.rename(inst, n) for n in binding["tables"]],
            "bindings": {blocks.rename(inst, loc): blocks.rename(inst, src) for loc, src in binding["bindings"].items()}}


_INDEX, _ESTIMATES = 6, 9  # ep_dispatch's argument positions of the layer index and the expected fan-out


def _layer_facts(memo: dict, tables, experts: int, ep: int, gpn: int, gate: tuple) -> tuple:
    """(slots per rank, GPUs' experts, max nodes per token, expected fan-out) of a layer's tables, once per distinct tables."""
    key = (*(t.numpy().tobytes() for t in tables), experts, ep, gpn, gate)
    if key not in memo:
        n_group, topk_group, top_k = gate
        per_rank = check_tables(*tables, experts, ep)
        bound = max_nodes_per_token(tables[0], experts, n_group, topk_group, per_rank, gpn)
        estimates = expected_targets(tables[0], tables[1], experts, n_group, topk_group, top_k, per_rank, gpn)
        per_gpu = [len(set(tables[0][r * per_rank : (r + 1) * per_rank].tolist())) for r in range(ep)]
        memo[key] = per_rank, per_gpu, bound, estimates
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
        gate = _gate_args(program, node)
        dispatch = binding = None
        for inst in (program.blocks.of(key) if program.blocks is not None else []) or [None]:
            unit = key if inst is None else inst.unit
            tables = layer_tables(placement, index, unit, experts)
            per_rank, per_gpu, bound, estimates = _layer_facts(memo, tables, experts, ep, gpn, gate)
            bound = min(spans, bound)
            # decode's low-latency dispatch sends each token straight to its experts' GPUs over IB (no NVLink
            # forwarding), so the node limit, which bounds the IB hops of two-hop dispatch, binds train and prefill
            if spans > 1 and bound > gate[1] and program.mode != "decode":
                raise PartitionError(
                    f"{unit}: with EP {ep} over {spans} nodes of {gpn} GPUs a token can reach {bound} nodes, "
                    f"more than topk_group={gate[1]}; map expert groups to nodes"
                )  # fmt: skip
            if dispatch is None:  # the block itself (its first instance)
                binding, dispatch = _rewrite(program, node, index, key, tables, ep, gpn, estimates)
                layers[unit] = dict(binding)
            else:
                layers[unit] = _instance(program, inst, dispatch, binding, index, tables, estimates)
            layers[unit]["experts"] = experts
            per_layer.append({"layer": unit, "slots_per_gpu": per_rank, "experts_per_gpu": max(per_gpu),
                              "redundant_experts": tables[0].numel() - experts, "max_nodes_per_token": bound,
                              "expected_nodes_per_token": round(estimates[0], 4),
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
        "layers": per_layer,
    }

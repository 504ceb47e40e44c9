"""cost: annotate every node with its Cost (meta['cost']), sum it per block and collect each block's kernel facts.

Training graphs execute a backward: `bwd_flops` as each op's record states, and `recompute_flops` the
forward FLOPs again of the nodes marked for recomputation. Inference graphs have no backward: both are 0.
An ATen GEMM that reads a weight computes a weight gradient as large as its forward (`wgrad_flops`);
`weight_bytes` counts the weight arguments a node reads unless its record says otherwise.

Blocks: 'embed' (the nodes before the first layer), 'layers.N', 'mtp.K' and 'head' (the final norm and
the output head). `facts` lists per block every distinct kernel call once with its count: what the
pricing module (`dsv3c.cost.price`) times under a parallel plan; `params` the elements of the weights each block
reads (routed experts apart). In a program of blocks every layer gets its own entries: its block's, its nodes
costed with the arguments of its own where it has some (an MoE layer's fan-out).
"""

from dsv3c.cost.nodes import hardware_flops, model_flops, node_cost
from dsv3c.ir import Plan, layer_of, module_path
from passes.registry import register

KEYS = ("flops", "bwd_flops", "recompute_flops", "bytes", "ib_bytes", "nvlink_bytes")


@register("cost", "annotates each node with meta['cost'] (FLOPs forward/backward, bytes, link bytes, kernel class and "
          "shape) and collects each block's kernel facts; the graph is unchanged", writes=["costs"])
def cost(plan: Plan, opts: dict):
    """Per-node cost, totals per block and for the graph, and the blocks' kernel facts."""
    program = plan.program
    train = program.mode == "train"
    units: dict[str, list] = {}  # the program's units in graph order -> [(node, cost)]
    seen_layer = False
    for node in program.graph.nodes:
        c = _node_cost(program, node, node.args, train)
        node.meta["cost"] = c
        block = layer_of(node)
        seen_layer = seen_layer or block is not None
        units.setdefault(block or ("head" if seen_layer else "embed"), []).append((node, c))
    per_layer, facts, params = {}, {}, {}
    for unit, items in units.items():
        sums = {}  # per distinct set of instance arguments: the unit's sums
        for name, varied in _instances(program, unit):
            key = tuple((n, _hashable(a)) for n, a in sorted(varied.items()))
            if key not in sums:
                costed = [(n, _node_cost(program, n, varied[n.name], train) if n.name in varied else c) for n, c in items]
                sums[key] = _sums(program, unit, costed)
            per_layer[name], facts[name], params[name] = dict(sums[key][0]), *sums[key][1:]
    totals = {key: sum(b[key] for b in per_layer.values()) for key in KEYS}
    tokens = program.shapes["batch"] * program.shapes["seq"]
    plan.analyses.costs = {"total": totals, "per_layer": per_layer, "tokens": tokens, "facts": facts, "params": params}
    return {"flops": totals["flops"], "bwd_flops": totals["bwd_flops"], "recompute_flops": totals["recompute_flops"],
            "bytes": totals["bytes"], "model_flops_per_token": model_flops(totals, train) // tokens,
            "hardware_flops_per_token": hardware_flops(totals) // tokens}


def _node_cost(program, node, args, train: bool) -> dict:
    """The cost dict of one node called with args (the weight bytes it reads counted when its record does not)."""
    c = node_cost(node, args).as_dict()
    if node.op == "call_function":
        weights = sum(a.meta["val"].numel() * a.meta["val"].element_size() for a in node.all_input_nodes
                      if a.op == "placeholder" and a.name in program.weights)
        if not c["weight_bytes"]:
            c["weight_bytes"] = weights
        if weights and c["kernel"] == "gemm" and not c["wgrad_flops"]:
            c["wgrad_flops"] = c["flops"]
    c["recompute_flops"] = c["flops"] if train and node.meta.get("recompute") is not None else 0
    if not train:
        c["bwd_flops"] = c["wgrad_flops"] = 0
    return c


def _instances(program, unit: str):
    """(model unit, {node name: its arguments there}) of each unit of the model the program's unit computes, in
    model order: the unit itself in a whole graph; each instance of a block, with the arguments of its own."""
    blocks = program.blocks
    instances = blocks.of(unit) if blocks is not None else []
    if not instances:
        yield unit, {}
    nodes = {n.name: n for n in program.graph.nodes} if instances else {}
    for inst in instances:
        yield inst.unit, {name: blocks.node_args(inst, nodes[name]) for (u, name) in blocks.args if u == inst.unit}


def _hashable(value):
    """value with its lists made tuples."""
    return tuple(map(_hashable, value)) if isinstance(value, (list, tuple)) else value


def _sums(program, block: str, items: list) -> tuple[dict, list, dict]:
    """(totals, kernel facts, weight sums) of one unit's costed nodes."""
    bucket, facts, weights = dict.fromkeys(KEYS, 0), {}, {}
    for node, c in items:
        for key in KEYS:
            bucket[key] += c[key]
        if c["kernel"] != "none" and node.op == "call_function":
            _add_fact(facts, _role(node, block), c)
            for a in node.all_input_nodes:
                if a.op == "placeholder" and a.name in program.weights:
                    val = a.meta["val"]
                    weights[a.name] = (val.numel(), val.numel() * val.element_size(), c["kernel"] == "experts")
    return bucket, list(facts.values()), _param_sums(weights)


def _role(node, block: str) -> str:
    """The node's module path inside its block ('self_attn.q_b_proj'; '' for the block itself)."""
    path = module_path(node)
    return path[len(block) + 1:] if path.startswith(block + ".") else ("" if path == block else path)


def _add_fact(bucket: dict, role: str, c: dict) -> None:
    """Count one kernel call into its block's facts (calls with equal role, kernel, dtype, shape and recompute merge)."""
    recompute = bool(c["recompute_flops"])
    key = (role, c["kernel"], c["dtype"], tuple(c["shape"]), recompute, c["flops"], c["bytes"])
    if key in bucket:
        bucket[key]["count"] += 1
        return
    bucket[key] = {"role": role, "kernel": c["kernel"], "dtype": c["dtype"], "shape": list(c["shape"]), "count": 1,
                   "recompute": recompute, **{k: c[k] for k in ("flops", "bwd_flops", "wgrad_flops", "bytes",
                                                                "weight_bytes", "ib_bytes", "nvlink_bytes")}}


def _param_sums(weights: dict) -> dict:
    """Elements and bytes of a block's weights, the routed experts' apart."""
    out = {}
    for key, expert in (("dense", False), ("expert", True)):
        out[key] = sum(n for n, _, e in weights.values() if e == expert)
        out[key + "_bytes"] = sum(b for _, b, e in weights.values() if e == expert)
    return out

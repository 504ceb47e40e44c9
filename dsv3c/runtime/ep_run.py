"""Run a plan's expert-partitioned program on torch.distributed ranks and compare it with one process.

`run_ep(make_job(cfg, plan, names, train, seed, batch, seq))` starts the plan's mesh.gpus ranks as forked gloo CPU
processes (localhost TCP rendezvous); `run_worker` is the same rank under torchrun (`env://`, NCCL with
cuda:LOCAL_RANK when CUDA is present, every tensor of the rank on that device).

What runs: the model, built with the same seed on every rank (float32; BF16 for an FP8 inference run, as
`dsv3c run` executes a lowered graph), captured at one rank's shapes (`dsv3c.capture`, mode 'train' or
'prefill') and transformed by the plan's passes (`run_passes`: the ones that change what the program
computes, in the plan's order: dce, mla_fuse, fp8_quant, expert_partition, and lower_triton for inference)
with the plan's ParallelPlan as the `parallel` analysis. So the precision is the plan's: with fp8_quant,
dispatch carries E4M3 codes with 1x128 scales, the local experts run the grouped FP8 GEMM (the Triton
kernel after lower_triton, interpreted on CPU), combine is BF16. Every rank binds its own expert slots
(EP rank r holds slots r·S .. r·S+S−1 of each MoE layer's placement, redundant replicas included) and
runs its own micro-batch (data parallel over the world), under an EPContext over the plan's EP group
(`dsv3c.runtime.layout`: consecutive ranks, GPUs per node and route from the plan). With `train` it computes

    L = CE(main head, next token) + 0.3 · CE(MTP head, token after next)    (means over the global batch)

and its backward. When forked, the parent captures and transforms once (the ranks inherit the program:
export costs seconds per process on shared CPUs) and computes the reference once; under torchrun each rank
prepares itself and rank 0 the reference.

The reference is one process on the whole batch: the eager float32 model for an unquantized plan (logits
max relative error max|Δ| / max|reference| ≤ REL_TOL, loss relative error ≤ REL_TOL, every parameter's
gradient cos-diff 1 − 2Σxy / Σ(x² + y²) ≤ COS_TOL), and for an FP8 plan the single-process FP8 program
(the same passes under the one-GPU plan) within FP8_REL_TOL, the bound fp8_quant documents for the FP8
rounding of the logits (passes/README.md), with top-1 agreement ≥ FP8_TOP1_MIN (training: the loss within
FP8_LOSS_TOL relative; the gradients' cos-diff is reported, not bounded: FP8 Dgrad/Wgrad quantisation turns
any difference of the forward, such as the BF16 rounding of the combine's partial sums, into whole E4M3
steps, and a near-tie routing decision that moves changes an expert's gradient outright); the errors against
the eager model are reported too. With FP32 partial sums on the wire the FP8 run equals the single-process
program to float rounding: the BF16 combine is the whole difference.
Expert gradients are the slots' gradients summed into their logical experts over all ranks. The run also
reports its layout as the ranks hold it (coordinates, groups, slots), the most nodes one token reached,
the per-layer expert loads, the rows each hop sent and the rows received against the padded capacity.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

MTP_WEIGHT = 0.3
REL_TOL = 1e-5
COS_TOL = 1e-10
FP8_REL_TOL = 0.2
FP8_TOP1_MIN = 0.9
FP8_LOSS_TOL = 1e-2
MAX_PARAMS = 50_000_000  # every rank holds the whole model to bind its experts and, on rank 0, run the reference
RUN_PASSES = ("dce", "mla_fuse", "fp8_quant", "expert_partition", "lower_triton")  # passes that change the function


class EPRunError(ValueError):
    """Run sizes that cannot work (EP not dividing the ranks or the expert slots, a model too large)."""


_PREPARED: dict = {}  # job key -> Prepared, made by the parent, inherited by the forked ranks


def run_passes(names, train: bool) -> list[str]:
    """The plan's passes a run applies: those that change what the program computes (lower_triton only for
    inference: a lowered graph has no backward)."""
    keep = [n for n in names if n in RUN_PASSES and not (train and n == "lower_triton")]
    return keep if "expert_partition" in keep else [*keep, "expert_partition"]


def precision(names) -> str:
    """'fp8' when the passes quantise (fp8_quant), else 'bf16' (the unquantized recipe, float32 on CPU)."""
    return "fp8" if "fp8_quant" in names else "bf16"


def build(cfg, seed: int, dtype=None):
    """The CPU model with seeded random weights (every rank builds the same); dtype None: float32."""
    from model_def import DeepseekV3

    torch.manual_seed(seed)
    model = DeepseekV3(cfg, dtype=dtype)
    model.reset_parameters(std=0.05, seed=seed)
    return model


class Prepared:
    """One rank's program (SPMD: rank 0's expert bindings) and the weights its expert slots are cut from."""

    def __init__(self, cfg, plan, names: list[str], mode: str, batch: int, seq: int, seed: int):
        import dsv3c
        import passes
        import targets
        from dsv3c.ir import Plan
        from dsv3c.passmgr.pipeline import run_pipeline

        fp8_inference = precision(names) == "fp8" and mode != "train"
        self.model = build(cfg, seed, torch.bfloat16 if fp8_inference else None)
        program = dsv3c.capture(cfg, mode=mode, batch=batch, seq=seq, model=self.model)
        ir = Plan(program, targets.get_target(f"h800x{plan.mesh.gpus}"), options={"aot": False})
        ir.analyses.parallel = plan
        cut = names.index("expert_partition")
        run_pipeline(ir, names[:cut], passes.REGISTRY, passes.CAPTURED_OPS)
        self.full = dict(ir.program.weights)  # the stacked expert weights the ranks' slots come from
        run_pipeline(ir, names[cut:], passes.REGISTRY, passes.legal_after(names[:cut]))
        self.program, self.names, self.mode = ir.program, names, mode
        self.lowered = "lower_triton" in names


def prepare(cfg, plan, names, mode, batch, seq, seed) -> Prepared:
    """The Prepared program of this job (made once per process)."""
    key = (cfg.name, json.dumps(plan.to_dict(), sort_keys=True), tuple(names), mode, batch, seq, seed)
    if key not in _PREPARED:
        _PREPARED[key] = Prepared(cfg, plan, list(names), mode, batch, seq, seed)
    return _PREPARED[key]


def bind(program, full: dict, ep_rank: int) -> dict:
    """Bind EP rank ep_rank's local expert weights (its slots of each layer) from the stacked weights `full`;
    returns {local weight: (source weight, the logical expert of each slot)}."""
    out = {}
    for layer in program.ep["layers"].values():
        phy2log = program.weights[layer["tables"][0]]
        per = phy2log.numel() // program.ep["ep"]
        slots = phy2log[ep_rank * per : (ep_rank + 1) * per]
        for local, source in layer["bindings"].items():
            program.weights[local] = full[source][slots].clone()
            out[local] = (source, slots.tolist())
    return out


def loss_sum(outs: dict, ids: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This micro-batch's share of L = CE_main + 0.3·CE_mtp (sums divided by the global token counts)."""
    f = torch.nn.functional
    logits = outs["logits"].float()
    s = ids.shape[1]
    loss = f.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / (global_batch * (s - 1))
    if "mtp_logits" in outs and s > 2:
        mtp = outs["mtp_logits"].float()
        ce = f.cross_entropy(mtp[:, : s - 2].flatten(0, 1), ids[:, 2:].flatten(), reduction="sum")
        loss = loss + MTP_WEIGHT * ce / (global_batch * (s - 2))
    return loss


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − 2Σxy / Σ(x² + y²) in float64 (0 for two zero tensors)."""
    x, y = x.double().flatten(), y.double().flatten()
    den = (x * x + y * y).sum()
    return 0.0 if den == 0 else float(1 - 2 * (x * y).sum() / den)


def param_name(placeholder: str, params: set) -> str | None:
    """The model parameter a weight placeholder stands for ('p_layers_0_x' → 'layers.0.x'), or None."""
    names = {"p_" + n.replace(".", "_"): n for n in params}
    return names.get(placeholder)


def execute(prep: Prepared, ep_rank: int, ids: torch.Tensor, global_batch: int, train: bool, device,
            tracer=None) -> tuple[dict, float | None, dict, dict]:  # fmt: skip
    """Run this rank's program on ids (the EP context already active): (outputs, loss share, gradients by model
    parameter (expert slots summed into [experts, ...]), the slots held by local weight)."""
    from dsv3c.runtime.executor import to_device

    program = copy.copy(prep.program)
    program.weights = dict(prep.program.weights)
    held = bind(program, prep.full, ep_rank)
    to_device(program, str(device))
    params = {n for n, _ in prep.model.named_parameters()}
    grads_of = {}
    if train:
        for n, t in list(program.weights.items()):
            if n in held or param_name(n, params):
                program.weights[n] = grads_of[n] = t.detach().clone().requires_grad_(True)
    args = [ids.to(device)]
    start = time.perf_counter()
    with torch.enable_grad() if train else torch.no_grad():
        outs = program(*args)
        loss = loss_sum(outs, ids.to(device), global_batch) if train else None
    if tracer is not None:
        tracer.span("forward", "compute", start, time.perf_counter())
    grads = {}
    if train:
        start = time.perf_counter()
        loss.backward()
        if tracer is not None:
            tracer.span("backward", "compute", start, time.perf_counter())
        for n, t in grads_of.items():
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            if n in held:
                source, slots = held[n]
                full = prep.full[source]
                name = param_name(source, params) or source
                acc = grads.setdefault(name, torch.zeros(full.shape, dtype=torch.float32, device=g.device))
                acc.index_add_(0, torch.tensor(slots, device=g.device), g.float())
            else:
                grads[param_name(n, params)] = g.float()
    return {k: v.detach() for k, v in outs.items()}, None if loss is None else float(loss.detach()), grads, held


def reference(cfg, plan, names, train: bool, seed: int, batch: int, seq: int, world: int) -> dict:
    """The single process on the whole batch: the eager model (unquantized) or the single-GPU FP8 program."""
    from dsv3c.parallel.plan import single_gpu

    all_ids = batch_ids(cfg, world, batch, seq, seed)
    mode = "train" if train else "prefill"
    if precision(names) == "fp8":
        prep = Prepared(cfg, single_gpu(cfg, mode), names, mode, world * batch, seq, seed)
        outs, loss, grads, _ = execute(prep, 0, all_ids, world * batch, train, "cpu")
        eager = _eager(prep.model, all_ids, world * batch, False)[0]
        return {"outs": outs, "loss": loss, "grads": grads, "eager_logits": eager["logits"]}
    model = build(cfg, seed)
    outs, loss, grads = _eager(model, all_ids, world * batch, train)
    return {"outs": outs, "loss": loss, "grads": grads}


def _eager(model, ids, global_batch: int, train: bool):
    """(outputs, loss, gradients) of the eager model on ids."""
    with torch.enable_grad() if train else torch.no_grad():
        out = model(ids, mtp=model.cfg.num_nextn_predict_layers > 0)
        outs = {"logits": out[0], "mtp_logits": out[1]} if isinstance(out, tuple) else {"logits": out}
        loss = loss_sum(outs, ids, global_batch) if train else None
        if train:
            model.zero_grad()
            loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).float() for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in outs.items()}, None if loss is None else float(loss.detach()), grads if train else {}


def batch_ids(cfg, world: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    """The global batch [world·batch, seq] of token ids; rank r takes rows r·batch .. r·batch+batch−1."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, cfg.vocab_size, (world * batch, seq), generator=gen)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| in float32."""
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def run_worker(rank: int, world: int, job: dict, init: str | None = None, out_path: str | None = None) -> dict | None:
    """One rank of the run described by job (see run_ep); rank 0 returns (and writes) the result."""
    from dsv3c.runtime.layout import in_process_group

    return in_process_group(rank, world, job.get("backend"), init, lambda dev: _run_rank(rank, world, job, dev, out_path))


def _run_rank(rank, world, job, device, out_path):
    """This rank's run; on rank 0 the gathered figures against the reference."""
    from dsv3c.ops.ep_context import active
    from dsv3c.runtime.layout import Groups
    from dsv3c.runtime.trace import Tracer, exposed

    cfg, plan, names, train = job["cfg"], job["plan"], job["names"], job["train"]
    batch, seq, seed = job["batch"], job["seq"], job["seed"]
    mode = "train" if train else "prefill"
    groups = Groups(plan.mesh, rank, mode)
    prep = prepare(cfg, plan, names, mode, batch, seq, seed)
    me = plan.mesh.rank(rank)
    tracer = Tracer()
    ctx = groups.ep_context(observe=True, link_delay=job["link_delay"], tracer=tracer)
    all_ids = batch_ids(cfg, world, batch, seq, seed)
    ids = all_ids[me["dp"] * batch : (me["dp"] + 1) * batch]
    with active(ctx):
        outs, loss, grads, held = execute(prep, me["ep"], ids, world * batch, train, device, tracer)
    for g in grads.values():  # every rank's share: the sum over ranks is the whole batch's gradient
        dist.all_reduce(g)
    stats = torch.tensor([ctx.max_nodes_per_token, ctx.max_gpus_per_token], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    layers = sorted(prep.program.ep["layers"].items(), key=lambda kv: kv[1]["index"])
    load = torch.stack([torch.as_tensor(ctx.load.get(v["index"], torch.zeros(v["experts"], dtype=torch.long)))
                        for _, v in layers]).to(device) if layers else torch.zeros(0, 0, dtype=torch.long)  # fmt: skip
    dist.all_reduce(load)
    slots = {name: held[next(iter(v["bindings"]))][1] for name, v in layers if v["bindings"]}
    mine = {"layout": {**groups.describe(), "slots": slots}, "sent_rows": dict(ctx.sent_rows),
            "received_tokens": ctx.received_tokens, "token_capacity": ctx.token_capacity,
            "logits": outs["logits"].cpu(), "loss": loss, "spans": tracer.spans}  # fmt: skip
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    ref = job.get("reference") or reference(cfg, plan, names, train, seed, batch, seq, world)
    logits = torch.cat([g["logits"] for g in gathered])
    want = ref["outs"]["logits"]
    fp8 = precision(names) == "fp8"
    result = {"ranks": world, "ep": plan.mesh.ep, "train": train, "mode": mode, "precision": precision(names),
              "passes": names, "lowered": prep.lowered, "route": groups.route, "gpus_per_node": plan.mesh.gpus_per_node,
              "tokens_per_rank": batch * seq, "reference": "single-process FP8 program" if fp8 else "eager model",
              "logits_max_rel_err": _rel(logits, want),
              "top1_agreement": float((logits.float().argmax(-1) == want.float().argmax(-1)).float().mean()),
              "max_nodes_per_token": int(stats[0]), "max_gpus_per_token": int(stats[1]),
              "sent_rows": {hop: sum(g["sent_rows"][hop] for g in gathered) for hop in gathered[0]["sent_rows"]},
              "received_tokens": sum(g["received_tokens"] for g in gathered),
              "token_capacity": sum(g["token_capacity"] for g in gathered),
              "exposed_comm": [exposed(g["spans"]) for g in gathered], "expert_load": load.cpu().tolist(),
              "layout": [g["layout"] for g in gathered]}  # fmt: skip
    if fp8:
        result["logits_max_rel_err_vs_eager"] = _rel(logits, ref["eager_logits"])
    if train:
        total = sum(g["loss"] for g in gathered)
        result["loss"], result["reference_loss"] = total, ref["loss"]
        result["loss_rel_err"] = abs(total - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        diffs = {n: cos_diff(g, ref["grads"][n]) for n, g in grads.items() if n in ref["grads"]}
        worst = max(diffs, key=diffs.get) if diffs else ""
        result["grad_max_cos_diff"], result["grad_worst"] = diffs.get(worst, 0.0), worst
        result["grads_missing"] = sorted(set(ref["grads"]) - set(grads))
    result["tolerances"] = tolerances(fp8, train)
    result["ok"] = within(result)
    if job.get("trace"):
        from dsv3c.runtime.trace import write_trace

        write_trace(job["trace"], {"ep": [g["spans"] for g in gathered]})
        result["trace"] = str(job["trace"])
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f)
    return result


def tolerances(fp8: bool, train: bool) -> dict:
    """The bounds a run is held to (module docstring)."""
    if fp8:
        return {"logits_rel": FP8_REL_TOL, "top1": FP8_TOP1_MIN, **({"loss_rel": FP8_LOSS_TOL} if train else {})}
    return {"logits_rel": REL_TOL, **({"loss_rel": REL_TOL, "grad_cos": COS_TOL} if train else {})}


def within(result: dict) -> bool:
    """Whether a run's figures are within its tolerances (FP8 gradients: reported, not bounded)."""
    tol = result["tolerances"]
    ok = result["logits_max_rel_err"] <= tol["logits_rel"] and result["top1_agreement"] >= tol.get("top1", 0.0)
    if result["train"]:
        ok = ok and result["loss_rel_err"] <= tol["loss_rel"] and not result["grads_missing"]
        ok = ok and ("grad_cos" not in tol or result["grad_max_cos_diff"] <= tol["grad_cos"])
    return bool(ok)


def check_sizes(cfg, plan) -> None:
    """EPRunError for sizes that cannot run."""
    from model_def import DeepseekV3
    from model_def.counts import parameter_counts

    total = parameter_counts(DeepseekV3(cfg, device="meta"))["total"]
    if total > MAX_PARAMS:
        raise EPRunError(f"model {cfg.name} has {total:,} parameters; the distributed run holds it on every rank "
                         f"(at most {MAX_PARAMS:,})")  # fmt: skip
    if plan.mesh.pp != 1 or plan.mesh.tp != 1:
        raise EPRunError(f"the EP run executes pp 1 and tp 1 layouts, not pp {plan.mesh.pp} tp {plan.mesh.tp}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_job(cfg, plan, names, train: bool = False, seed: int = 0, batch: int = 1, seq: int = 8, link_delay: float = 0.0,
             trace=None) -> dict:  # fmt: skip
    """The description of one run (checked; names: the plan's passes, filtered by run_passes)."""
    from passes.expert_partition import PartitionError

    check_sizes(cfg, plan)
    names = run_passes(names, train)
    job = {"cfg": cfg, "plan": plan, "names": names, "train": train, "seed": seed, "batch": batch, "seq": seq,
           "link_delay": link_delay, "trace": None if trace is None else str(trace)}  # fmt: skip
    try:
        prepare(cfg, plan, names, "train" if train else "prefill", batch, seq, seed)  # the passes' own checks first
    except PartitionError as e:
        raise EPRunError(str(e)) from None
    return job


def run_ep(job: dict) -> dict:
    """Run a make_job job on the plan's mesh.gpus forked gloo processes; the measured differences."""
    import torch.multiprocessing as mp

    plan = job["plan"]
    job = {**job, "reference": reference(job["cfg"], plan, job["names"], job["train"], job["seed"], job["batch"],
                                         job["seq"], plan.mesh.gpus)}  # fmt: skip
    fd, out = tempfile.mkstemp(prefix="dsv3c-ep-", suffix=".json")
    os.close(fd)
    try:
        init = f"tcp://127.0.0.1:{_free_port()}"
        mp.start_processes(_spawned, args=(plan.mesh.gpus, job, init, out), nprocs=plan.mesh.gpus, start_method="fork",
                           join=True)  # fmt: skip
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def _spawned(rank, *args):
    """torch.multiprocessing entry: rank first."""
    run_worker(rank, *args)

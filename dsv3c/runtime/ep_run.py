"""Run the expert-partitioned program on torch.distributed ranks and compare it with the eager model.

`run_ep(cfg, ranks, ep, train, seed)` starts `ranks` gloo CPU processes (torch.multiprocessing, fork,
localhost TCP rendezvous). Every rank: builds the model with the same seed in float32, captures it
(`dsv3c.capture`, mode 'train' with --train, else 'prefill'), runs `expert_partition` with `ep`, binds
its local expert weights from the placement (EP rank r = rank mod ep holds slots r·S .. r·S+S−1), and
runs its own micro-batch (data parallel over the world; the EP groups are consecutive blocks of ep
ranks), so dispatch and combine are real `all_to_all_single`s. With `train` it computes the loss

    L = CE(main head, next token) + 0.3 · CE(MTP head, token after next)    (means over the global batch)

and its backward. It compares with the single-process eager model on the whole batch: logits max
relative error (max|Δ| / max|eager|), loss relative error, and every parameter's gradient cos-diff
1 − 2Σxy / Σ(x² + y²): experts' slot gradients gathered from their ranks and summed over replicas,
dense parameters' gradients all-reduced. It also measures the most nodes one token reached (EP rank r
on node r // gpus_per_node; default 2 so EP 4 spans two "nodes") and the per-layer expert loads.

The same worker runs under torchrun (`python -m dsv3c.runtime.ep_run --ep E ...`, `env://`): with
CUDA available the backend becomes NCCL, but moving the model and program to the rank's GPU is not
written yet (everything here runs on CPU; neither torchrun nor NCCL has been exercised).
When launched by run_ep the parent captures once and the forked ranks inherit the capture (export
costs seconds per process on shared CPUs); under torchrun each rank captures itself.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile

import torch
import torch.distributed as dist

MTP_WEIGHT = 0.3
REL_TOL = 1e-5
COS_TOL = 1e-10
MAX_PARAMS = 50_000_000  # every rank holds the whole model in float32 to bind its experts and run eager


class EPRunError(ValueError):
    """Run sizes that cannot work (EP not dividing the ranks or the expert slots, a model too large)."""


_PREPARED: dict = {}  # (mode, batch, seq) -> (model, program) captured by the parent, inherited by fork


def build(cfg, seed: int):
    """The float32 CPU model with seeded random weights (every rank builds the same)."""
    from model_def import DeepseekV3

    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
    model.reset_parameters(std=0.05, seed=seed)
    return model


def prepare(cfg, mode: str, batch: int, seq: int, seed: int):
    """(model, captured program) for one rank's micro-batch shape."""
    import dsv3c

    key = (id(cfg), mode, batch, seq, seed)
    if key not in _PREPARED:
        model = build(cfg, seed)
        _PREPARED[key] = (model, dsv3c.capture(cfg, mode=mode, batch=batch, seq=seq, model=model))
    return _PREPARED[key]


def partition(program, ep: int, gpus_per_node: int, placement=None):
    """The program with expert_partition applied (a copy) under an EP-only parallel plan, and the pass stats."""
    import passes
    import targets
    from dsv3c.ir import Plan
    from dsv3c.parallel.plan import expert_parallel

    plan = Plan(copy.deepcopy(program), targets.get_target(f"h800x{max(ep, gpus_per_node)}"))
    plan.analyses.parallel = expert_parallel(program.cfg, program.mode, ep, gpus_per_node, placement)
    stats = passes.REGISTRY["expert_partition"].fn(plan, {})
    return plan.program, stats


def bind(program, full: dict, ep_rank: int) -> None:
    """Bind EP rank ep_rank's local expert weights (its slots of each layer) from the stacked weights `full`."""
    for layer in program.ep["layers"].values():
        phy2log = program.weights[layer["tables"][0]]
        per = phy2log.numel() // program.ep["ep"]
        for local, source in layer["bindings"].items():
            program.weights[local] = full[source][phy2log[ep_rank * per : (ep_rank + 1) * per]].clone()


def loss_sum(outs: dict, ids: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This micro-batch's share of L = CE_main + 0.3·CE_mtp (sums divided by the global token counts)."""
    f = torch.nn.functional
    logits = outs["logits"]
    s = ids.shape[1]
    loss = f.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / (global_batch * (s - 1))
    if "mtp_logits" in outs and s > 2:
        mtp = outs["mtp_logits"]
        ce = f.cross_entropy(mtp[:, : s - 2].flatten(0, 1), ids[:, 2:].flatten(), reduction="sum")
        loss = loss + MTP_WEIGHT * ce / (global_batch * (s - 2))
    return loss


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 − 2Σxy / Σ(x² + y²) in float64 (0 for two zero tensors)."""
    x, y = x.double().flatten(), y.double().flatten()
    den = (x * x + y * y).sum()
    return 0.0 if den == 0 else float(1 - 2 * (x * y).sum() / den)


def _worker(rank: int, world: int, ep: int, cfg, train: bool, seed: int, batch: int, seq: int, gpus_per_node: int,
            init: str, out_path: str | None, placement=None, load_path: str | None = None) -> dict | None:  # fmt: skip
    """One rank: partitioned run on its micro-batch, eager reference, errors reduced to rank 0."""
    from dsv3c.ops.ep_context import EPContext, active

    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() and init == "env://" else "gloo"
    if init == "env://":
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        groups = [dist.new_group(list(range(g * ep, (g + 1) * ep))) for g in range(world // ep)]
        group, ep_rank = groups[rank // ep], rank % ep
        mode = "train" if train else "prefill"
        model, base = prepare(cfg, mode, batch, seq, seed)
        program, _ = partition(base, ep, gpus_per_node, placement)
        bind(program, base.weights, ep_rank)
        gen = torch.Generator().manual_seed(seed + 1)
        all_ids = torch.randint(0, cfg.vocab_size, (world * batch, seq), generator=gen)
        ids = all_ids[rank * batch : (rank + 1) * batch]
        params = {n for n, p in model.named_parameters()}
        name_of = {"p_" + n.replace(".", "_"): n for n in params}
        locals_ = {loc: src for layer in program.ep["layers"].values() for loc, src in layer["bindings"].items()}
        if train:
            for n, t in list(program.weights.items()):
                if n in name_of or n in locals_:
                    program.weights[n] = t.detach().clone().requires_grad_(True)
        ctx = EPContext(rank=ep_rank, size=ep, group=group, gpus_per_node=gpus_per_node, observe=True)
        with active(ctx), torch.enable_grad() if train else torch.no_grad():
            outs = program(ids)
            loss = loss_sum(outs, ids, world * batch) if train else None
            if train:
                loss.backward()
        # eager reference on the whole batch (every rank computes the same)
        with torch.enable_grad() if train else torch.no_grad():
            ref = model(all_ids, mtp=cfg.num_nextn_predict_layers > 0)
            ref = {"logits": ref[0], "mtp_logits": ref[1]} if isinstance(ref, tuple) else {"logits": ref}
            ref_loss = loss_sum(ref, all_ids, world * batch) if train else None
            if train:
                model.zero_grad()
                ref_loss.backward()
        mine = ref["logits"][rank * batch : (rank + 1) * batch].detach()
        stats = torch.tensor([(outs["logits"].detach() - mine).abs().max(), mine.abs().max(),
                              float(ctx.max_nodes_per_token), float(ctx.max_gpus_per_token)], dtype=torch.float64)  # fmt: skip
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        result = {"ranks": world, "ep": ep, "train": train, "logits_max_rel_err": float(stats[0] / stats[1]),
                  "max_nodes_per_token": int(stats[2]), "max_gpus_per_token": int(stats[3]),
                  "gpus_per_node": gpus_per_node, "tokens_per_rank": batch * seq}  # fmt: skip
        if train:
            total = loss.detach().double().clone()
            dist.all_reduce(total)
            ref_loss = ref_loss.detach()
            result["loss"], result["eager_loss"] = float(total), float(ref_loss)
            result["loss_rel_err"] = abs(float(total) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
            result["grad_max_cos_diff"], result["grad_worst"] = _grad_diffs(program, model, name_of, locals_, ep_rank)
        layers = sorted(program.ep["layers"].values(), key=lambda v: v["index"])
        load = torch.stack([torch.as_tensor(ctx.load.get(v["index"], torch.zeros(v["experts"], dtype=torch.long)))
                            for v in layers]) if layers else torch.zeros(0, 0, dtype=torch.long)  # fmt: skip
        dist.all_reduce(load)
        result["expert_load"] = load.tolist()
        result["ok"] = result["logits_max_rel_err"] <= REL_TOL and (
            not train or (result["loss_rel_err"] <= REL_TOL and result["grad_max_cos_diff"] <= COS_TOL)
        )
        if rank == 0 and out_path:
            with open(out_path, "w") as f:
                json.dump(result, f)
        return result
    finally:
        dist.destroy_process_group()


def _grad_diffs(program, model, name_of: dict, locals_: dict, ep_rank: int) -> tuple[float, str]:
    """Max cos-diff over all parameters between the distributed and eager gradients (all ranks take part)."""
    grads = {}
    for n, src in sorted(locals_.items()):
        t = program.weights[n]
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        layer = next(v for v in program.ep["layers"].values() if n in v["bindings"])
        phy2log = program.weights[layer["tables"][0]]
        per = g.shape[0]
        slots = torch.zeros((phy2log.numel(), *g.shape[1:]), dtype=g.dtype)
        slots[ep_rank * per : (ep_rank + 1) * per] = g
        dist.all_reduce(slots)  # over the EP group's ranks (their slots) and the DP copies of the group
        full = torch.zeros((layer["experts"], *g.shape[1:]), dtype=g.dtype).index_add_(0, phy2log, slots)
        grads[name_of[src]] = full
    for n in sorted(name_of):
        if n in program.weights and name_of[n] not in grads:
            t = program.weights[n]
            g = t.grad.clone() if t.grad is not None else torch.zeros_like(t)
            dist.all_reduce(g)
            grads[name_of[n]] = g
    worst, which = 0.0, ""
    for name, p in model.named_parameters():
        if name in grads:
            ref = p.grad if p.grad is not None else torch.zeros_like(p)
            d = cos_diff(grads[name], ref)
            if d > worst or not which:
                worst, which = max(worst, d), name
    return worst, which


def check_sizes(cfg, ranks: int, ep: int, gpus_per_node: int, placement=None) -> None:
    """EPRunError for sizes that cannot run."""
    from model_def import DeepseekV3
    from model_def.counts import parameter_counts

    if ranks < 1 or ep < 1:
        raise EPRunError(f"ranks and ep must be positive, got ranks={ranks} ep={ep}")
    if ranks % ep:
        raise EPRunError(f"ep {ep} does not divide ranks {ranks}")
    slots = cfg.n_routed_experts if placement is None else int(placement[0].shape[-1])
    if slots % ep:
        raise EPRunError(f"ep {ep} does not divide the {slots} expert slots ({cfg.n_routed_experts} experts + "
                         f"{slots - cfg.n_routed_experts} redundant)")  # fmt: skip
    total = parameter_counts(DeepseekV3(cfg, device="meta"))["total"]
    if total > MAX_PARAMS:
        raise EPRunError(f"model {cfg.name} has {total:,} parameters; the distributed run holds it on every rank "
                         f"(at most {MAX_PARAMS:,})")  # fmt: skip
    if gpus_per_node < 1:
        raise EPRunError(f"gpus_per_node must be positive, got {gpus_per_node}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ep(cfg, ranks: int, ep: int | None = None, train: bool = False, seed: int = 0, batch: int = 1, seq: int = 8,
           gpus_per_node: int = 2, placement=None) -> dict:  # fmt: skip
    """Run the partitioned program on `ranks` gloo processes (EP groups of `ep`); the measured differences."""
    import torch.multiprocessing as mp

    from passes.expert_partition import PartitionError

    ep = ranks if ep is None else ep
    check_sizes(cfg, ranks, ep, gpus_per_node, placement)
    mode = "train" if train else "prefill"
    _, base = prepare(cfg, mode, batch, seq, seed)  # captured once here; the forked ranks inherit it
    try:
        partition(base, ep, gpus_per_node, placement)  # the pass's own checks (node limit) before any process starts
    except PartitionError as e:
        raise EPRunError(str(e)) from None
    fd, out = tempfile.mkstemp(prefix="dsv3c-ep-", suffix=".json")
    os.close(fd)
    try:
        init = f"tcp://127.0.0.1:{_free_port()}"
        args = (ranks, ep, cfg, train, seed, batch, seq, gpus_per_node, init, out, placement)
        mp.start_processes(_spawned, args=args, nprocs=ranks, start_method="fork", join=True)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def _spawned(rank, *args):
    """torch.multiprocessing entry: rank first."""
    _worker(rank, *args)


def main(argv=None) -> int:
    """torchrun entry: `torchrun --nproc-per-node N -m dsv3c.runtime.ep_run --ep E [--train] [--model tiny]`."""
    import argparse

    from model_def import ModelConfig

    p = argparse.ArgumentParser(prog="python -m dsv3c.runtime.ep_run")
    p.add_argument("--model", default="tiny")
    p.add_argument("--ep", type=int)
    p.add_argument("--train", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=2)
    a = p.parse_args(argv)
    cfg = ModelConfig.preset(a.model)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    check_sizes(cfg, world, a.ep or world, a.gpus_per_node)
    result = _worker(rank, world, a.ep or world, cfg, a.train, a.seed, a.batch, a.seq, a.gpus_per_node, "env://", None)
    if rank == 0:
        print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())


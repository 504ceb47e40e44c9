"""What one rank of a run takes from the ParallelPlan: coordinates, process groups, EP context, route.

Nothing here decides a layout. A rank's coordinates and every group's members are the plan's mesh
(`ParallelMesh.rank`, `ParallelMesh.groups`: a pipeline stage is dp consecutive ranks, an EP group ep
consecutive ranks inside it, edp the same EP rank in the stage's other EP groups), GPUs per node are the
mesh's. The route of dispatch is the one expert_partition prices: two-hop (IB to the sender's local index
on each target node, then NVLink) when the EP group spans nodes in training and prefill, as DeepEP's normal
kernels do; direct otherwise (one node, or decode, whose low-latency kernels go straight over IB).

`Groups` creates the process groups on every rank in the same order (torch.distributed requires it) and
keeps this rank's; `lanes` > 1 makes independent copies of the EP groups (the pipelined runtime's
overlapped forward and backward chunks exchange over their own groups). `describe` is what the run
reports of its layout, read back from the groups it created, for the comparison with the plan.
"""

from __future__ import annotations

from dsv3c.ops.ep_context import EPContext

KINDS = ("ep", "dp", "edp", "pp")


def backend_device(backend: str | None, init: str | None):
    """(backend, this rank's device): NCCL with cuda:LOCAL_RANK under torchrun (init None) when CUDA is present or
    asked for, else gloo on the CPU."""
    import os

    import torch

    backend = backend or ("nccl" if torch.cuda.is_available() and init is None else "gloo")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return backend, device
    return backend, torch.device("cpu")


def in_process_group(rank: int, world: int, backend: str | None, init: str | None, body):
    """body(device) run on one thread inside this rank's process group (init None: env:// under torchrun)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    backend, device = backend_device(backend, init)
    kw = {"init_method": init, "rank": rank, "world_size": world} if init else {}
    dist.init_process_group(backend, **kw)
    try:
        return body(device)
    finally:
        dist.destroy_process_group()


def route_of(mesh, mode: str) -> str:
    """'two-hop' when an EP group spans nodes outside decode, else 'direct'."""
    return "two-hop" if mesh.ep > mesh.ep_gpus_per_node and mode != "decode" else "direct"


class Groups:
    """The mesh's process groups (module docstring); `of[kind]` is this rank's group, `ep_lanes[i]` its EP groups
    (EP, rail, node) of lane i."""

    def __init__(self, mesh, rank: int, mode: str, lanes: int = 1):
        import torch.distributed as dist

        self.mesh, self.rank, self.route = mesh, rank, route_of(mesh, mode)
        self.of = {}
        for kind in KINDS:
            for members in mesh.groups()[kind]:
                group = dist.new_group(members)
                if rank in members:
                    self.of[kind] = group
        self.ep_lanes = []
        gpn = mesh.ep_gpus_per_node
        for _ in range(lanes):
            lane = {}
            for members in mesh.groups()["ep"]:
                mine = rank in members
                group = dist.new_group(members)
                lane["ep"] = group if mine else lane.get("ep")
                if self.route == "two-hop":
                    for local in range(gpn):
                        rail = dist.new_group(members[local::gpn])
                        if mine and rank in members[local::gpn]:
                            lane["rail"] = rail
                    for node in range(0, len(members), gpn):
                        part = dist.new_group(members[node : node + gpn])
                        if mine and rank in members[node : node + gpn]:
                            lane["node"] = part
            self.ep_lanes.append(lane)

    def ep_context(self, lane: int = 0, **kw) -> EPContext:
        """This rank's EPContext over lane's EP groups (kw: observe, link_delay, tracer)."""
        m, groups = self.mesh, self.ep_lanes[lane]
        return EPContext(rank=m.rank(self.rank)["ep"], size=m.ep, group=groups["ep"], gpus_per_node=m.ep_gpus_per_node,
                         route=self.route, rail_group=groups.get("rail"), node_group=groups.get("node"), **kw)

    def describe(self) -> dict:
        """This rank's coordinates and the members of its groups as torch.distributed holds them."""
        import torch.distributed as dist

        out = dict(self.mesh.rank(self.rank))
        out["groups"] = {kind: dist.get_process_group_ranks(g) for kind, g in self.of.items()}
        for name, g in self.ep_lanes[0].items():
            if name != "ep":
                out["groups"][name] = dist.get_process_group_ranks(g)
        out["gpus_per_node"], out["route"] = self.mesh.gpus_per_node, self.route
        return out

"""The parallel layout of a compile: the mesh (pp, ep, dp, tp, sp) and the expert placement it implies.

Defaults per target and mode follow DeepSeek-V3 (`dsv3c.placement.default_mesh`); `--parallel pp=16,ep=64`
overrides degrees. The placement: with an expert-load file, `rebalance_experts` places the mesh's
redundant slots on the heaviest experts; without one it is contiguous, and redundant slots (needed where
EP exceeds the expert count, as in the 320-GPU decode unit) replicate experts under a uniform load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3c.eplb import PlacementError, load_expert_load, load_stats, rebalance_experts
from dsv3c.placement import ExpertPlacement, ParallelMesh, default_mesh, keeps_node_limit, parse_parallel


@dataclass
class Layout:
    """The mesh, the per-layer placement tables of the MoE layers (MTP last) and the load they balance."""

    mesh: ParallelMesh
    tables: tuple | None  # (phy2log [L, P], log2phy [L, E, R], logcnt [L, E]) or None without MoE layers
    load: torch.Tensor | None  # [L, E] token counts from --expert-load, None when not given

    def placement_dict(self, cfg) -> dict:
        """plan.json 'experts': slots per GPU, redundant experts per layer and max/mean GPU load before/after."""
        if self.tables is None:
            return {"moe_layers": 0}
        phy2log, _, logcnt = self.tables
        mesh = self.mesh
        layers = [f"layers.{i}" for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers)]
        layers += [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]
        out = {"moe_layers": len(layers), "experts": cfg.n_routed_experts, "ep": mesh.ep,
               "slots_per_gpu": phy2log.shape[1] // mesh.ep, "redundant_slots": phy2log.shape[1] - cfg.n_routed_experts,
               "source": "expert-load file" if self.load is not None else "contiguous"}
        stats = load_stats(self.load, phy2log, logcnt, mesh.ep) if self.load is not None else None
        rows = []
        for i, name in enumerate(layers):
            row = {"layer": name, "redundant": sorted(int(e) for e in (logcnt[i] > 1).nonzero().flatten())}
            if stats:
                row["max_mean_before"] = round(stats["before"][i], 4)
                row["max_mean_after"] = round(stats["after"][i], 4)
            rows.append(row)
        out["layers"] = rows
        if stats:
            out["max_mean_before"] = round(max(stats["before"]), 4)
            out["max_mean_after"] = round(max(stats["after"]), 4)
        return out


def moe_layer_count(cfg) -> int:
    """MoE layers of the model, MTP's included."""
    dense = min(cfg.first_k_dense_replace, cfg.num_hidden_layers)
    return (cfg.num_hidden_layers - dense + cfg.num_nextn_predict_layers) if cfg.n_routed_experts else 0


def choose_layout(cfg, target, mode: str, parallel: str | None = None, expert_load=None) -> Layout:
    """The mesh for target and mode (with --parallel overrides) and the expert placement over its EP group."""
    overrides = parse_parallel(parallel) if parallel and parallel != "auto" else {}
    experts = cfg.n_routed_experts or 1
    load = None
    if expert_load is not None:
        load = load_expert_load(expert_load, moe_layer_count(cfg), cfg.n_routed_experts)
    mesh = default_mesh(target.gpus, target.gpus_per_node, mode, experts=experts, layers=cfg.num_hidden_layers,
                        **overrides)
    if load is None and "redundant" not in overrides and mesh.redundant and experts % mesh.ep == 0:
        # no load statistics: nothing to replicate for, unless EP needs slots beyond the experts
        mesh = default_mesh(target.gpus, target.gpus_per_node, mode, experts=experts, layers=cfg.num_hidden_layers,
                            **{**overrides, "redundant": 0})
    layers = moe_layer_count(cfg)
    if not layers:
        return Layout(mesh, None, load)
    slots = experts + mesh.redundant
    nodes = max(1, mesh.ep // target.gpus_per_node)
    weight = load if load is not None else torch.ones(layers, experts, dtype=torch.float64)
    if load is None and mesh.redundant == 0:
        phy2log = torch.arange(experts).expand(layers, experts).clone()
        from dsv3c.eplb import inverse_tables

        tables = (phy2log, *inverse_tables(phy2log, experts))
    else:
        tables = rebalance_experts(weight, slots, cfg.n_group, nodes, mesh.ep)
    # two-hop dispatch (train, prefill) needs the node limit of the config's groups: refuse before any capture
    placement = ExpertPlacement(mesh.ep, min(mesh.ep, target.gpus_per_node), *tables)
    if mode != "decode" and not keeps_node_limit(placement, cfg.n_group, cfg.topk_group):
        raise PlacementError(f"EP {mesh.ep} over {mesh.ep_nodes} nodes lets a token reach more than "
                             f"topk_group={cfg.topk_group} nodes (its groups span nodes); choose an EP degree that "
                             "maps expert groups to nodes")
    return Layout(mesh, tables, load)


__all__ = ["Layout", "PlacementError", "choose_layout", "moe_layer_count"]

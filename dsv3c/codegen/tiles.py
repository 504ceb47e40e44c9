"""Tile tables: each kernel family declares its own (`TileTable`), and `Tiles` looks them up for one target and mode.

A table maps a GPU arch to the family's config (BLOCK_* constexprs, num_warps, num_stages), one for all
modes or one per mode (train, prefill, decode). `shared_bytes` estimates the shared memory a config stages
(pipelined input tiles x num_stages plus resident tiles); a lookup drops stages until it fits the GPU's
per-block limit (227 KiB on Hopper) and raises TargetError if even one stage does not. A builder shrinks
a block larger than its dimension (`family.clamp_block`); row kernels size their block from the row length.
"""

from __future__ import annotations

from typing import Callable

from targets import MODES, TargetError, as_gpu_spec, compute_sms, gpu_spec

HOPPER = ("sm_90a", "sm_90")


def hopper(config: dict) -> dict:
    """A table entry valid on every Hopper arch."""
    return dict.fromkeys(HOPPER, config)


def row_shared_bytes(c: dict) -> int:
    """Row kernels: one fp32 tile for reductions per stage."""
    return c["num_stages"] * 4 * c["BLOCK_M"] * c["BLOCK_N"]


TILE_TABLES: dict[str, "TileTable"] = {}


class TileTable:
    """One kernel family's tile configs per GPU arch (and mode); registers itself under its family name."""

    def __init__(self, family: str, by_arch: dict, shared_bytes: Callable[[dict], int] = row_shared_bytes):
        self.family = family
        self.by_arch = by_arch
        self.shared_bytes = shared_bytes
        TILE_TABLES[family] = self

    def config(self, gpu, mode: str = "train") -> dict:
        """The tile config (BLOCK_*, num_warps, num_stages, shared_bytes, arch) of this family on a GPU."""
        gpu = as_gpu_spec(gpu)
        if mode not in MODES:
            raise TargetError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
        if gpu.arch not in self.by_arch:
            raise TargetError(f"no {self.family} tile table for arch {gpu.arch!r} of GPU {gpu.name} "
                              f"(known: {', '.join(self.by_arch)})")
        entry = self.by_arch[gpu.arch]
        c = dict(entry[mode] if mode in entry else entry)  # per-mode entries, or one for all modes
        while self.shared_bytes(c) > gpu.smem_per_block and c["num_stages"] > 1:
            c["num_stages"] -= 1
        c["shared_bytes"] = self.shared_bytes(c)
        if c["shared_bytes"] > gpu.smem_per_block:
            raise TargetError(f"{self.family} tiles need {c['shared_bytes']} B of shared memory; "
                              f"{gpu.name} allows {gpu.smem_per_block} B per block")
        c["arch"] = gpu.arch
        return c


def tile_tables() -> dict[str, TileTable]:
    """Every kernel family's tile table, by family name (the families of dsv3c.codegen.kernels imported first)."""
    from dsv3c.codegen.family import load_families

    load_families()
    return TILE_TABLES


def arches() -> list[str]:
    """The GPU archs every kernel family has tiles for."""
    tables = tile_tables().values()
    return [a for a in HOPPER if all(a in t.by_arch for t in tables)]


class Tiles:
    """Tile configs of the target GPU for one mode, looked up once per family.

    `overrides` ({family: {key: value}}) replaces entries of the target's table for this lookup only, e.g.
    {"fp8_gemm": {"BLOCK_M": 16, "BLOCK_N": 32}} (tests and benches of non-default tiles). Keys the table
    lacks are allowed where a builder reads them: mla_decode's NUM_SPLITS (else derived from the SMs)."""

    def __init__(self, target, mode: str, overrides: dict | None = None):
        self.target = target
        self.gpu = target.gpu if target is not None else gpu_spec("h800")
        self.mode = mode
        self.sms = compute_sms(target, mode) if target is not None else self.gpu.sms
        if overrides:
            unknown = set(overrides) - set(tile_tables())
            if unknown:
                raise ValueError(f"tile overrides for unknown families {sorted(unknown)} "
                                 f"(known: {sorted(tile_tables())})")
        self.overrides = {f: dict(c) for f, c in (overrides or {}).items()}
        self._memo: dict = {}

    def __call__(self, table: TileTable) -> dict:
        """The config of a family's table on this GPU and mode, with this lookup's overrides."""
        if table.family not in self._memo:
            self._memo[table.family] = {**table.config(self.gpu, self.mode), **self.overrides.get(table.family, {})}
        return self._memo[table.family]

    def key(self) -> tuple:
        """What the configs depend on: GPU, arch, mode, SMs and the overrides (part of a CallSpec's id)."""
        over = tuple(sorted((f, tuple(sorted(c.items()))) for f, c in self.overrides.items()))
        return (self.gpu.name, self.gpu.arch, self.mode, self.sms) + ((over,) if over else ())

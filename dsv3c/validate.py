"""Validation at the door: options, option combinations, shapes, grid/memory limits, targets and pass order.

Every check runs before capture and raises a one-line error (exit 2) naming the field and the accepted range.
"""

from pathlib import Path

CUDA_GRID_X = 2**31 - 1  # gridDim.x limit
CUDA_GRID_YZ = 65535  # gridDim.y / gridDim.z limit
MAX_GPUS = 1 << 16
RUN_MAX_BYTES = 16 * 10**9  # what `dsv3c run` may allocate for activations and logits
FIGURE_SPAN = 1000.0  # a target figure may lie this many times above or below the H800's


def _option_error(message: str) -> Exception:
    """The driver's OptionError (imported late: the driver imports torch)."""
    from dsv3c.driver import OptionError

    return OptionError(message)


# ---- command-line options ------------------------------------------------------------------------------


def check_compile_args(args) -> None:
    """Refuse compile options that are empty or that nothing would use (before any work)."""
    if args.passes is not None and not [n for n in args.passes.split(",") if n.strip()]:
        raise _option_error("--passes is empty: give a comma-separated pass list (see `dsv3c passes`)")
    if args.dump_mlir is not None and not args.dump_dir:
        raise _option_error("--dump-mlir needs --dump-dir (the MLIR is written there)")
    for flag, value in (("--out", args.out), ("--dump-dir", args.dump_dir)):
        if value is not None and not value.strip():
            raise _option_error(f"{flag} is empty: name a directory, or omit {flag} for the default")
    if args.out is not None and args.dump_dir is not None:
        check_disjoint(args.out, args.dump_dir)


def check_disjoint(out, dump_dir) -> None:
    """Refuse a dump directory that is, contains or lies inside the output directory."""
    a, b = Path(out).absolute().resolve(), Path(dump_dir).absolute().resolve()
    if a == b or a in b.parents or b in a.parents:
        raise _option_error(f"--dump-dir {dump_dir} and --out {out} must be separate directories")


def check_mode_options(mode: str, kv_len, command: str = "compile") -> None:
    """Refuse --kv-len in a mode without a KV cache (train, prefill): it would be recorded but unused."""
    if kv_len and mode != "decode":
        raise _option_error(f"--kv-len is only used by --mode decode; {command} --mode {mode} has no KV cache")


# ---- shapes ------------------------------------------------------------------------------------------


def check_grid(cfg, mode: str, shapes: dict) -> None:
    """Refuse shapes whose kernel launch grids exceed CUDA's limits (x < 2^31, y and z <= 65535)."""
    b, s = shapes["batch"], shapes["seq"]
    rows = b * s * max(cfg.num_experts_per_tok, 1)
    if rows > CUDA_GRID_X:
        raise _option_error(f"--batch x --seq = {b * s:,} tokens: the MoE and row kernels' grid x would be "
                            f"{rows:,}, beyond CUDA's limit {CUDA_GRID_X:,}; use batch x seq <= "
                            f"{CUDA_GRID_X // max(cfg.num_experts_per_tok, 1):,}")
    if mode != "decode" and b * cfg.num_attention_heads > CUDA_GRID_YZ:
        raise _option_error(f"--batch {b}: attention's grid y = batch x {cfg.num_attention_heads} heads would be "
                            f"{b * cfg.num_attention_heads:,}, beyond CUDA's limit {CUDA_GRID_YZ}; use --batch <= "
                            f"{CUDA_GRID_YZ // cfg.num_attention_heads}")


def run_bytes(cfg, mode: str, shapes: dict) -> int:
    """Estimated bytes `dsv3c run` allocates: logits (3 copies), activations, attention scores and the KV cache."""
    b, s, kv = shapes["batch"], shapes["seq"], shapes["kv_len"] if mode == "decode" else 0
    blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    tokens = b * s
    logits = 3 * 4 * tokens * cfg.vocab_size
    acts = 2 * 8 * tokens * max(cfg.hidden_size, cfg.intermediate_size) * (blocks + 1)
    scores = 4 * b * cfg.num_attention_heads * s * (s + kv)
    cache = 2 * 4 * b * kv * blocks * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.num_attention_heads
                                       * (cfg.qk_head_dim + cfg.v_head_dim))
    return logits + acts + scores + cache


def fit_default_shapes(cfg, mode: str, shapes: dict, given: dict) -> list[str]:
    """Shrink, in shapes, a default seq (train, prefill) or kv_len (decode) beyond the model's positions; a note
    for the report per change. What the user gave is left alone (and refused later if it does not fit)."""
    limit = cfg.max_position_embeddings
    key = "kv_len" if mode == "decode" else "seq"
    room = limit - (shapes["seq"] if mode == "decode" else 0)
    if key in given or shapes[key] <= room or room < 1:
        return []
    note = (f"default {key} {shapes[key]} exceeds what max_position_embeddings {limit} leaves"
            f"{' after seq ' + str(shapes['seq']) if mode == 'decode' else ''}; {key} {room} used")
    shapes[key] = room
    return [note]


def check_run_shapes(cfg, mode: str, shapes: dict, processes: int = 1) -> None:
    """Refuse run shapes beyond the positions the model has or the memory run may take (over all its processes)."""
    from dsv3c.frontend.exporter import check_shapes

    check_shapes(cfg, mode, **shapes)
    need = run_bytes(cfg, mode, shapes) * processes
    if need > RUN_MAX_BYTES:
        raise _option_error(f"--batch {shapes['batch']} --seq {shapes['seq']}" +
                            (f" --kv-len {shapes['kv_len']}" if mode == "decode" else "") +
                            (f" on {processes} processes" if processes > 1 else "") +
                            f": run would need about {need / 1e9:,.0f} GB, over its "
                            f"{RUN_MAX_BYTES / 1e9:.0f} GB limit")


# ---- work bounds (dsv3c.bounds) ---------------------------------------------------------------------------


def check_work(cfg, tgt, mode: str, parallel, micro_batches, global_batch) -> None:
    """Refuse, before any allocation or simulation, a training step or expert placement beyond dsv3c.bounds."""
    from dsv3c import bounds
    from dsv3c.parallel.build import DEFAULT_GLOBAL_BATCH, moe_layer_names
    from dsv3c.placement import parse_parallel

    if mode == "train":
        bounds.check_train_work(cfg, tgt.gpus, global_batch or DEFAULT_GLOBAL_BATCH, micro_batches)
    degrees = parse_parallel(parallel) if parallel not in (None, "auto") else {}
    if degrees.get("redundant"):
        bounds.check_placement_work(len(moe_layer_names(cfg)), cfg.n_routed_experts or 1, degrees["redundant"])


def check_run_sizes(ranks: int, micro_batches: int | None = None, tokens: int | None = None) -> None:
    """Refuse `dsv3c run` process counts, micro-batches or generated tokens beyond dsv3c.bounds."""
    from dsv3c import bounds

    for name, value, limit in (("--ranks", ranks, bounds.MAX_RUN_RANKS),
                               ("--micro-batches", micro_batches, bounds.MAX_RUN_MICRO_BATCHES),
                               ("--tokens", tokens, bounds.MAX_RUN_TOKENS)):
        if value is not None and value > limit:
            raise bounds.BoundError(f"{name} {value:,} is over the {limit:,} dsv3c run takes")


# ---- targets -----------------------------------------------------------------------------------------


def check_figures(tgt) -> None:
    """Refuse a target whose GPU figures or NIC bandwidth lie more than FIGURE_SPAN times off the H800's: a typo
    (a unit slip) or a value that would make the cost model's times or rates overflow or vanish."""
    import dataclasses

    from targets import TargetError
    from targets.gpus import GPUS

    ref = GPUS["h800"]
    figures = [(f"gpu_overrides.{f.name}", getattr(tgt.gpu, f.name), getattr(ref, f.name))
               for f in dataclasses.fields(ref) if f.type in ("int", "float")]
    figures.append(("nic_gbps", tgt.nic_bandwidth * 8 / 1e9, 400.0))
    for name, value, base in figures:
        lo, hi = base / FIGURE_SPAN, base * FIGURE_SPAN
        if not lo <= value <= hi:
            raise TargetError(f"target {tgt.name}: {name} = {value:g} is outside [{lo:g}, {hi:g}] "
                              f"({FIGURE_SPAN:g}x around the H800's {base:g})")


def check_target(tgt) -> None:
    """Refuse a target whose name cannot name an output directory, whose figures are absurd, or whose GPU no tile
    table fits."""
    from dsv3c.outdir import safe_name
    from dsv3c.codegen.tiles import arches, tile_tables
    from targets import MODES, TargetError

    safe_name(tgt.name, "target name")
    if tgt.gpus > MAX_GPUS:
        raise TargetError(f"target {tgt.name}: gpus must be at most {MAX_GPUS}, got {tgt.gpus}")
    check_figures(tgt)
    if tgt.gpu.arch not in arches():
        raise TargetError(f"target {tgt.name}: gpu arch {tgt.gpu.arch!r} is not supported (known: "
                          f"{', '.join(arches())})")
    for table in tile_tables().values():
        for mode in MODES:
            table.config(tgt.gpu, mode)  # raises TargetError when smem_per_block is too small


# ---- passes ------------------------------------------------------------------------------------------


def check_pass_order(names: list[str], registry: dict) -> None:
    """Refuse a pass list that runs a pass before one it must follow, or after one that invalidates it."""
    for i, name in enumerate(names):
        p = registry[name]
        for earlier in names[:i]:
            inv = registry[earlier].invalidates
            if "*" in inv or name in inv:
                rule = "must be the last pass" if "*" in inv else f"replaces what {name} works on; run {name} first"
                raise _option_error(f"--passes {','.join(names)}: pass '{name}' cannot run after '{earlier}' "
                                    f"({earlier} {rule})")
        for needed in p.after:
            if needed in names[i + 1:] and needed not in names[:i]:
                raise _option_error(f"--passes {','.join(names)}: pass '{name}' must run after '{needed}' "
                                    f"(put {needed} before {name})")


# ---- the whole compile -------------------------------------------------------------------------------


def check_compile(cfg, tgt, mode: str, shapes: dict, names: list[str], kv_len, out, dump_dir) -> None:
    """All compile checks that need the resolved target, mode and shapes; raises before anything is written."""
    import passes
    from dsv3c.frontend.exporter import check_shapes
    from dsv3c.outdir import check_replaceable

    check_target(tgt)
    check_mode_options(mode, kv_len)
    check_pass_order(names, passes.REGISTRY)
    check_shapes(cfg, mode, **shapes)
    check_grid(cfg, mode, shapes)
    check_replaceable(out, "--out")
    if dump_dir is not None:
        check_disjoint(out, dump_dir)
        check_replaceable(dump_dir, "--dump-dir")

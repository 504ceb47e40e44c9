"""Validation at the door: options, option combinations, shapes, grid/memory limits, targets and pass order.

Every check runs before capture and raises a one-line error (exit 2) naming the field and the accepted range.
"""

from pathlib import Path

CUDA_GRID_X = 2**31 - 1  # gridDim.x limit
CUDA_GRID_YZ = 65535  # gridDim.y / gridDim.z limit
MAX_GPUS = 1 << 16
RUN_MAX_BYTES = 16 * 10**9  # what `dsv3c run` may allocate for activations and logits


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


def check_run_shapes(cfg, mode: str, shapes: dict) -> None:
    """Refuse run shapes beyond the positions the model has or the memory run may take."""
    from dsv3c.frontend.exporter import check_shapes

    check_shapes(cfg, mode, **shapes)
    need = run_bytes(cfg, mode, shapes)
    if need > RUN_MAX_BYTES:
        raise _option_error(f"--batch {shapes['batch']} --seq {shapes['seq']}" +
                            (f" --kv-len {shapes['kv_len']}" if mode == "decode" else "") +
                            f": run would need about {need / 1e9:,.0f} GB, over its "
                            f"{RUN_MAX_BYTES / 1e9:.0f} GB limit")


# ---- targets -----------------------------------------------------------------------------------------


def check_target(tgt) -> None:
    """Refuse a target whose name cannot name an output directory, or whose GPU no tile table fits."""
    from dsv3c.outdir import safe_name
    from dsv3c.codegen.tiles import arches, tile_tables
    from targets import MODES, TargetError

    safe_name(tgt.name, "target name")
    if tgt.gpus > MAX_GPUS:
        raise TargetError(f"target {tgt.name}: gpus must be at most {MAX_GPUS}, got {tgt.gpus}")
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

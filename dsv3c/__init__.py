"""dsv3c: compile DeepSeek-V3-class MoE models for H800 clusters."""

__version__ = "0.1.0"

from dsv3c import ops  # noqa: F401  (registers the dsv3 op vocabulary)


def capture(cfg, mode: str = "train", batch: int = 1, seq: int = 4096, kv_len: int = 0, model=None):
    """Export cfg's model (MTP included) for mode at the given shapes as a Program (see dsv3c.frontend.exporter)."""
    from dsv3c.frontend.exporter import capture as _capture  # late: exporter imports model_def, which imports dsv3c.ops

    return _capture(cfg, mode, batch, seq, kv_len, model)


def capture_blocks(cfg, mode: str = "train", batch: int = 1, seq: int = 4096, kv_len: int = 0, model=None):
    """Export each distinct block of cfg's model once, as a program of blocks (see dsv3c.frontend.exporter)."""
    from dsv3c.frontend.exporter import capture_blocks as _capture_blocks

    return _capture_blocks(cfg, mode, batch, seq, kv_len, model)


def compile(cfg, target: str = "h800x2048", mode: str | None = None, out: str | None = None, **options):
    """Capture cfg, run the pass pipeline for target and mode, write artifacts to out; returns the plan dict."""
    from dsv3c.driver import compile_model

    return compile_model(cfg, target=target, mode=mode, out=out, **options)


__all__ = ["capture", "capture_blocks", "compile", "__version__"]

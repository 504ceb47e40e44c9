"""dsv3c: compile DeepSeek-V3-class MoE models for H800 clusters."""

__version__ = "0.1.0"

from dsv3c import ops  # noqa: F401  (registers the dsv3 op vocabulary)
from dsv3c.capture import capture


def compile(cfg, target: str = "h800x2048", mode: str | None = None, out: str | None = None, **options):
    """Capture cfg, run the pass pipeline for target and mode, write artifacts to out; returns the plan dict."""
    from dsv3c.driver import compile_model

    return compile_model(cfg, target=target, mode=mode, out=out, **options)


__all__ = ["capture", "compile", "__version__"]

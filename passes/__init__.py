"""How the model is transformed: one module per pass, registered by name in `passes.registry`."""

from passes import cost, dce  # noqa: F401  (importing a pass module registers it)
from passes.registry import CAPTURED_OPS, REGISTRY, Pass, default_pipeline, legal_after

for _optional in ("mla_fuse", "fp8_quant", "lower_triton", "expert_partition"):
    try:
        __import__(f"passes.{_optional}")
    except ModuleNotFoundError as e:
        if e.name != f"passes.{_optional}":
            raise

__all__ = ["CAPTURED_OPS", "REGISTRY", "Pass", "default_pipeline", "legal_after"]

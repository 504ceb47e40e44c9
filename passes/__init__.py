"""How the model is transformed: one module per pass, registered by name in `passes.registry`."""

from passes import (cost, dce, expert_partition, fp8_quant, lower_triton, mla_fuse,  # noqa: F401  (registers them)
                    pipeline_partition)
from passes.registry import (CAPTURED_OPS, REGISTRY, Option, Pass, PassSpecError, default_pipeline, format_pipeline,
                             legal_after, parse_pipeline)

__all__ = ["CAPTURED_OPS", "REGISTRY", "Option", "Pass", "PassSpecError", "default_pipeline", "format_pipeline",
           "legal_after", "parse_pipeline"]

"""Test-wide settings: Triton's CPU interpreter and the Hypothesis profiles."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on the CPU; must be set before triton is imported
# compiled kernels (ours and Triton's) go to a per-run cache, inherited by the commands tests start
os.environ.setdefault("DSV3C_CACHE_DIR", tempfile.mkdtemp(prefix="dsv3c-test-kernels-"))
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="dsv3c-test-triton-"))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

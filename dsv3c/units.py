"""Human units for reports: bytes in GB/MiB, bandwidths in GB/s or TB/s, FLOP rates in TFLOPS."""


def fmt_bytes(n: float) -> str:
    """A byte count as GB (10^9) above 1 GB, else KiB/MiB."""
    if n >= 1e9:
        return f"{n / 1e9:,.1f} GB"
    if n >= 1024**2:
        return f"{n / 1024**2:,.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{int(n):,} B"


def fmt_rate(bps: float) -> str:
    """A bandwidth in bytes/s as TB/s (from 1 TB/s) or GB/s."""
    return f"{bps / 1e12:,.2f} TB/s" if bps >= 1e12 else f"{bps / 1e9:,.1f} GB/s"


def fmt_flops(fps: float) -> str:
    """A FLOP/s rate as TFLOPS."""
    return f"{fps / 1e12:,.0f} TFLOPS"


def target_value(key: str, value):
    """A plan.json target field for report.txt, with units for byte counts, bandwidths and FLOP rates."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if key.endswith("_flops"):
        return fmt_flops(value)
    if key.endswith("_bandwidth") or key.endswith("_achieved"):
        return fmt_rate(value)
    if key.endswith("_bytes") or key.endswith("_per_block"):
        return fmt_bytes(value)
    return value

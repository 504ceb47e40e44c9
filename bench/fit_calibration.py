"""Fit the "fit" constants of dsv3c/cost/calibration_constants.py to the published kernel and link tables, offline.

    python bench/fit_calibration.py          # prints each fit: values, +-2 SE ranges, residuals

Each group of constants is fitted on its rows of `dsv3c.cost.fidelity` (the planner's own functions, so the
fit and the fidelity table cannot disagree) by least squares on log time: deterministic coordinate descent
from fixed starting points, with step halving. The range printed for a constant is value x exp(+-2 standard
errors of its log) from the least-squares covariance. The printed values are what calibration_constants.py holds
(rounded to 4 significant figures); tests/test_calibration.py re-runs the fit and compares.
Only kernel- and link-level published measurements are used; no end-to-end figure.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3c.cost.calibration_constants import default_values  # noqa: E402
from dsv3c.cost.fidelity import rows  # noqa: E402

# group -> {constant: (start, upper bound)}; lower bounds are 0 (exclusive)
FITS = {
    "gemm": {"gemm_fixed_us": (3.0, 50.0), "gemm_tensor_efficiency": (0.8, 1.0), "gemm_overlap": (0.3, 1.0),
             "gemm_tile_fill_k": (200.0, 5000.0)},
    "attention": {"attn_fwd_efficiency_hd128": (0.65, 1.0), "attn_fwd_efficiency_hd256": (0.75, 1.0),
                  "attn_fwd_short_keys": (200.0, 1e4), "attn_causal_extra_pairs": (128.0, 1e4),
                  "attn_bwd_efficiency_hd128": (0.57, 1.0), "attn_bwd_short_keys": (300.0, 1e4)},
    "mla": {"mla_fixed_us": (10.0, 200.0), "mla_hbm_efficiency": (0.9, 1.0), "mla_tensor_efficiency": (0.7, 1.0),
            "mla_overlap": (0.1, 1.0)},
    "ll_dispatch": {"ep_ll_dispatch_alpha_us": (20.0, 500.0), "ep_ll_dispatch_ib_GBps": (45.0, 400.0),
                    "ep_ll_dispatch_nvlink_GBps": (150.0, 900.0)},
    "ll_combine": {"ep_ll_combine_alpha_us": (20.0, 500.0), "ep_ll_combine_ib_GBps": (45.0, 400.0),
                   "ep_ll_combine_nvlink_GBps": (150.0, 900.0)},
}


def log_loss(group_rows, c) -> float:
    """Sum over rows of (ln predicted time - ln published time)^2."""
    return sum((math.log(r.predict(c)) - math.log(r.published_seconds)) ** 2 for r in group_rows)


def fit_group(group: str) -> dict[str, float]:
    """The fitted values of a group's constants (the other constants at their calibrated values)."""
    params = FITS[group]
    group_rows = [r for r in rows() if r.group == group]
    c = dict(default_values(), **{name: start for name, (start, _) in params.items()})
    best = log_loss(group_rows, c)
    step = {name: start * 0.25 for name, (start, _) in params.items()}
    while max(step[n] / c[n] for n in params) > 1e-7:
        improved = False
        for name, (_, upper) in params.items():
            for delta in (step[name], -step[name]):
                trial = dict(c, **{name: c[name] + delta})
                if not 0 < trial[name] <= upper:
                    continue
                loss = log_loss(group_rows, trial)
                if loss < best:
                    best, c, improved = loss, trial, True
        if not improved:
            step = {n: s / 2 for n, s in step.items()}
    return {name: c[name] for name in params}


def _inverse(matrix: list[list[float]]) -> list[list[float]] | None:
    """The inverse of a small square matrix by Gauss-Jordan elimination (None if singular)."""
    n = len(matrix)
    work = [list(row) + [float(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(work[r][col]))
        if abs(work[pivot][col]) < 1e-12:
            return None
        work[col], work[pivot] = work[pivot], work[col]
        lead = work[col][col]
        work[col] = [x / lead for x in work[col]]
        for r in range(n):
            if r != col:
                factor = work[r][col]
                work[r] = [x - factor * y for x, y in zip(work[r], work[col])]
    return [row[n:] for row in work]


def fit_ranges(group: str, fitted: dict) -> dict[str, tuple[float, float] | None]:
    """Per constant, value x exp(+-2 standard errors of its log), from the least-squares covariance.

    Residuals r_i = ln(predicted / published) at the fit, J = d r / d ln(value), covariance of ln(values) =
    s^2 (J^T J)^-1 with s^2 = sum r^2 / (rows - constants). None when J^T J is singular."""
    c = dict(default_values(), **fitted)
    group_rows = [r for r in rows() if r.group == group]
    names = list(FITS[group])
    resid = [math.log(r.predict(c) / r.published_seconds) for r in group_rows]
    jac = []
    for r in group_rows:
        row = []
        for name in names:
            up, down = (r.predict(dict(c, **{name: c[name] * f})) for f in (1.01, 1 / 1.01))
            row.append(math.log(up / down) / (2 * math.log(1.01)))
        jac.append(row)
    jtj = [[sum(j[a] * j[b] for j in jac) for b in range(len(names))] for a in range(len(names))]
    inv = _inverse(jtj)
    if inv is None:
        return {name: None for name in names}
    s2 = sum(x * x for x in resid) / max(1, len(resid) - len(names))
    out = {}
    for i, name in enumerate(names):
        spread = 2 * math.sqrt(max(inv[i][i] * s2, 0.0))
        out[name] = (c[name] * math.exp(-spread), min(c[name] * math.exp(spread), FITS[group][name][1]))
    return out


def sig4(x: float) -> float:
    """x rounded to 4 significant figures."""
    return float(f"{x:.4g}")


def main() -> None:
    """Fit every group and print values, ranges and residuals."""
    for group in FITS:
        fitted = fit_group(group)
        ranges = fit_ranges(group, fitted)
        print(f"== {group}")
        for name, value in fitted.items():
            rng = ranges[name]
            shown = f"({sig4(rng[0])}, {sig4(rng[1])})" if rng else "(none: singular fit)"
            print(f"  {name:32s} {sig4(value):>10}   +-2 SE {shown}")
        c = dict(default_values(), **fitted)
        errs = []
        for r in (r for r in rows() if r.group == group):
            e = r.predict(c) / r.published_seconds - 1
            errs.append(abs(e))
            print(f"    {r.kernel:20s} {r.conditions:40s} {e * 100:+6.1f}%")
        errs.sort()
        print(f"  residuals: median {errs[len(errs) // 2] * 100:.1f}%, worst {errs[-1] * 100:.1f}%")


if __name__ == "__main__":
    main()

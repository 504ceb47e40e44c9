"""The calibration table: every published kernel/link measurement used, the prediction for it, the error.

    python bench/fidelity.py            # table, then median and worst |error| per kernel class and overall
    python bench/fidelity.py --json     # the same as JSON

Predictions come from the planner's own functions (dsv3c.cost.kernels, dsv3c.cost.links) with the calibrated
constants (dsv3c.cost.calibration_constants), through dsv3c.cost.fidelity. The published and predicted columns are in
the unit the source publishes (TFLOPS, GB/s or us); the error is always on time: predicted time / published
time - 1 (published time = work / published throughput). Role "fit": fitted jointly with other rows;
"defines": the figure a constant is set to, reproduced up to the latency terms by construction.
Runs on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tabulate import tabulate  # noqa: E402

from dsv3c.cost.fidelity import summary, table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Print the fidelity table and its summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    rows = table()
    stats = summary(rows)
    if args.json:
        print(json.dumps({"rows": rows, "summary": stats}, indent=1))
        return
    print(tabulate([[r["kernel"], r["conditions"], r["role"], r["unit"], f"{r['published']:.4g}",
                     f"{r['predicted']:.4g}", f"{r['error'] * 100:+.1f}%"] for r in rows],
                   headers=["kernel class", "shape / conditions", "role", "unit", "published", "predicted",
                            "error (time)"]))
    print()
    print(tabulate([[name, s["rows"], f"{s['median'] * 100:.1f}%", f"{s['worst'] * 100:.1f}%"]
                    for name, s in stats.items()],
                   headers=["kernel class", "rows", "median |error|", "worst |error|"]))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fits collectives-report's simulator on recorded testbed runs and checks it on the others.

Calibration set: the size sweeps on 4 hosts at 500 Mbit/s (64 KiB to 256 MiB), the ring's
(sweep_4hosts_500mbit.json) and the reduction server's with 4 reducers (sweep_4+4_500mbit.json).
Held out: every other run of the library in benchmarks/results/ (other host counts, ranks per
host, racks, rates, reducer counts, DDP training steps), except repeats of a calibration
configuration. Writes collectives/report/calibration.toml (shipped with the package, printed
by every report) and prints the validation table; exits 1 if the median error on the held-out
runs is above 15%.

    python benchmarks/calibrate.py            # rewrite collectives/report/calibration.toml
    python benchmarks/calibrate.py --check    # only print the table
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from collectives.report import calibration as cal

HERE = Path(__file__).resolve().parent
CALIBRATION_FILES = ("sweep_4hosts_500mbit.json", "sweep_4+4_500mbit.json")
BAR = 0.15


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of compare.py/train.py JSON")
    parser.add_argument("--out", default=str(HERE.parent / "collectives/report/calibration.toml"))
    parser.add_argument("--check", action="store_true", help="print the table, write nothing")
    args = parser.parse_args()
    results = Path(args.results)

    fitted = [m for name in CALIBRATION_FILES for m in cal.measurements(str(results / name))]
    configs = {m.config for m in fitted}
    held_out = [m for path in sorted(results.glob("*.json")) if path.name not in CALIBRATION_FILES
                for m in cal.measurements(str(path)) if m.config not in configs]
    rates = [(row["goodput_GBps"] * 8, row["rate_gbps"]) for name in CALIBRATION_FILES
             for row in json.loads((results / name).read_text()) if row.get("system") == "collectives"]
    goodput_fraction = sum(g for g, _ in rates) / sum(r for _, r in rates)
    calibration = cal.fit([m for m in fitted if m.plan == "ring"], [m for m in fitted if m.plan == "reduction_server"],
                          goodput_fraction)
    checks = cal.check(calibration, held_out)
    stored = cal.Stored(calibration, [f"{m.source}: {m.describe()}" for m in fitted], checks,
                        "python benchmarks/calibrate.py", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))

    c = calibration
    print(f"alpha {c.alpha_s * 1e3:.3f} ms per ring step; reduction server latency {c.rs_steps:.2f} steps; "
          f"efficiency: rings {c.ring_efficiency:.3f}, reduction server {c.rs_efficiency:.3f}; "
          f"goodput {c.goodput_fraction:.3f} of the link rate")
    print(f"fitted on {len(fitted)} runs; fit error median {cal.median_error(cal.check(c, fitted)):.1%}")
    for k in checks:
        print(f"{k.source:42} {k.description:75} measured {k.measured_s * 1e3:9.1f} ms  "
              f"modelled {k.modelled_s * 1e3:9.1f} ms  {k.error:+6.1%}  {k.note}")
    median = cal.median_error(checks)
    print(f"held out: {len(checks)} runs, median |error| {median:.1%} (bar <= {BAR:.0%}), "
          f"max {max(abs(k.error) for k in checks):.1%}")
    if not args.check:
        Path(args.out).write_text(cal.dumps(stored))
        print(f"wrote {args.out}")
    return 0 if median <= BAR else 1


if __name__ == "__main__":
    sys.exit(main())

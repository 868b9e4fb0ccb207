"""``camphive demo`` end to end, as a new user meets it: wall time (goal: under 10 minutes on
2 cores, dense training included) and its report, recorded in RESULTS.md.

The dense-model cache is pointed at an empty folder so the run trains from scratch.

    python benchmarks/demo.py
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import publish, report_for_results, run_cli_timed

GOAL_MINUTES = 10


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="camphive-demo-"))
    out = scratch / "run"
    wall = run_cli_timed(["demo", "--out", str(out)], env={"CAMPHIVE_CACHE": str(scratch / "cache")})
    verdict = "meets" if wall < GOAL_MINUTES * 60 else "misses"
    body = (f"`camphive demo` with an empty cache: **{wall / 60:.1f} minutes wall**, dense training included "
            f"({verdict} the {GOAL_MINUTES}-minute goal).\n\n{report_for_results(out)}")
    publish("camphive demo", body, write=not args.no_write)


if __name__ == "__main__":
    main()

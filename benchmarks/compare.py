"""``camphive compare`` end to end: wall time of a recipe and its report, recorded in RESULTS.md.

Runs the command exactly as a user would (a fresh run folder, the dense model trained
inside the run), times it, and appends the run's ``report.md`` with the wall time.

    python benchmarks/compare.py --config configs/fashion-mnist-small-cnn.yaml
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import ROOT, publish, report_for_results, run_cli_timed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "fashion-mnist-small-cnn.yaml"))
    parser.add_argument("--out", default=None, help="run folder (default: a new temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("extra", nargs="*", help="more options for camphive compare, after --")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="camphive-compare-")) / "run"
    wall = run_cli_timed(["compare", "--config", args.config, "--out", str(out), *args.extra])
    config = Path(args.config).resolve()
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    body = (f"`camphive compare --config {shown}`{' ' + ' '.join(args.extra) if args.extra else ''}: "
            f"**{wall / 60:.1f} minutes wall** for the whole run (dense training included).\n\n"
            f"{report_for_results(out)}")
    publish(f"camphive compare: {shown}", body, write=not args.no_write)


if __name__ == "__main__":
    main()

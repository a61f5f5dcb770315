"""``dlion report RUN_DIR... [--out DIR]``: report.json files in; a Markdown table, a summary
and PNG plots out (see dlion.report.runs for how runs are read and grouped)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlion.report import runs
from dlion.report.plots import plots
from dlion.report.runs import DEFAULT_OUT, REPORT, ReportError, group_runs, load_runs
from dlion.report.table import SPREAD, markdown_table, summarize


def _clean(x: Any) -> Any:
    """NaN to null, so summary.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return [_clean(v) for v in x] if isinstance(x, list) else x


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help=f"a run directory, its {REPORT}, or a folder of runs"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")


def run_report(args: argparse.Namespace) -> int:
    """Read, group, write; bad input is one line on stderr and exit status 2, not a traceback."""
    try:
        groups = group_runs(load_runs(args.runs))
    except ReportError as e:
        print(f"dlion report: error: {e}", file=sys.stderr)
        return 2
    rows = [summarize(g) for g in groups]
    table = markdown_table(rows)
    print(table)
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        pngs = plots(groups, out)
        figures = "".join(f"\n![{p.stem}]({p.name})" for p in pngs)
        (out / "report.md").write_text(f"# Training runs\n\n{table}\n{figures}\n")
        summary = {"spread": SPREAD, "rows": rows}
        (out / "summary.json").write_text(json.dumps(_clean(summary), indent=1, allow_nan=False) + "\n")
    except OSError as e:
        print(f"dlion report: error: cannot write to {out}: {e}", file=sys.stderr)
        return 1
    names = ", ".join(p.name for p in pngs) or "no plots (matplotlib is missing: pip install -e '.[bench]')"
    n_runs = sum(len(g.runs) for g in groups)
    print(f"\n{len(rows)} configurations from {n_runs} runs; wrote {out}/report.md, summary.json, {names}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dlion report",
        description=runs.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_report_arguments(parser)
    return run_report(parser.parse_args(argv))

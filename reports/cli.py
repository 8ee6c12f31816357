"""`layersim report DIR [--out FILE]`: write the offline HTML report for a results folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reports.html import write_report
from reports.load import check_complete
from sim.results import clean_leftovers, record_rewritten


def build_parser(prog: str = "layersim report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description="Write one self-contained HTML report "
                                "(works offline) for a results folder.")
    p.add_argument("dir", help="results folder (holds <policy>/metrics.json, sweep.json, capacity.json)")
    p.add_argument("--out", "-o", default=None, help="output HTML file (default: DIR/report.html)")
    p.add_argument("--title", default=None, help="report title (default: from the folder name)")
    return p


def report_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_complete(args.dir)  # an interrupted or mixed run is refused, not rendered
        target = Path(args.out) if args.out is not None else Path(args.dir) / "report.html"
        clean_leftovers(target.parent)  # what an earlier, killed report left
        out = write_report(args.dir, args.out, title=args.title)
        if out.resolve() == (Path(args.dir) / "report.html").resolve():
            record_rewritten(Path(args.dir))  # the folder's COMPLETE lists the new report
    except ValueError as e:
        # One line, no traceback: the usual cause is a wrong or empty folder.
        print(f"layersim report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"layersim report: error: cannot write report: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(report_main())

"""Self-contained offline HTML reports for layersim results folders (`layersim report DIR`)."""

from reports.html import render_report, write_report
from reports.load import Capacity, Results, Run, load_results

__all__ = ["Capacity", "Results", "Run", "load_results", "render_report", "write_report"]

"""Tests for reports/: loading a results folder, the figures, the offline HTML file, the CLI,
and (marked `browser`) rendering the report in headless Chromium with no console errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import figures as F
from reports import load_results, write_report
from reports.cli import report_main

CHROMIUM = Path("/usr/bin/chromium")
PLOTLY_HEADER = re.compile(r"\* plotly\.js v\d")
FIG_DIV = re.compile(r'<div id="(fig-[\w-]+)" class="plotly-graph-div')


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small simulated runs, plus a synthetic sweep and capacity search to cover every plot."""
    from costmodel import CostModel, Parallelism, load_model
    from sim import simulate
    from traces import WorkloadSpec, build_workload

    out = tmp_path_factory.mktemp("results")
    w = build_workload(WorkloadSpec("arxiv-long", rate=1.0, duration_s=20, seed=0))
    cm = CostModel(load_model("qwen3-30b-a3b"), "h100", parallel=Parallelism(tp=2))
    for policy in ("chunked:512", "layered"):
        simulate(w.requests, cm, policy).write(out)
    sweep = [{"policy": p, "rate": r, "slo_attainment": a, "goodput": r * a}
             for p, base in (("chunked:512", 0.9), ("layered", 1.0))
             for r, a in ((0.5, base), (1.0, base - 0.1), (2.0, base - 0.5))]
    (out / "sweep.json").write_text(json.dumps(sweep))
    capacity = {"search": [{"rate": 1.0, "slo_attainment": 0.99, "meets": True},
                           {"rate": 4.0, "slo_attainment": 0.40, "meets": False},
                           {"rate": 2.0, "slo_attainment": 0.93, "meets": False}],
                "answer": {"rate": 1.0, "policy": "layered", "target": 0.95}}
    (out / "capacity.json").write_text(json.dumps(capacity))
    return out


@pytest.fixture(scope="module")
def report(results_dir: Path) -> Path:
    return write_report(results_dir)


# ---- loading -----------------------------------------------------------------------------------
def test_load_discovers_runs_sweep_and_capacity(results_dir: Path) -> None:
    res = load_results(results_dir)
    assert [r.label for r in res.runs] == ["chunked:512", "layered"]
    assert all(r.requests is not None and len(r.requests) for r in res.runs)
    assert all(r.iterations is not None and len(r.iterations) for r in res.runs)
    assert res.sweep is not None and len(res.sweep) == 6
    assert res.capacity is not None and res.capacity.target == 0.95
    assert res.notes == ()


def test_missing_or_empty_dir_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_results(tmp_path / "nope")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_engine_and_sim_subfolders_are_labelled(tmp_path: Path) -> None:
    for sub in ("engine", "sim"):
        d = tmp_path / "layered" / sub
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"policy": "layered", "mean_ttft_ms": 10.0}))
    (tmp_path / "validation.json").write_text(json.dumps({"ttft_error": 0.05}))
    res = load_results(tmp_path)
    assert [r.label for r in res.runs] == ["layered [engine]", "layered [sim]"]
    assert res.validation == {"ttft_error": 0.05}


def test_metrics_only_runs_with_nulls_and_bad_files(tmp_path: Path) -> None:
    """No parquet, null metrics, a damaged file: the report still builds and says what it skipped."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(
        {"policy": "a", "mean_ttft_ms": 100.0, "p99_itl_ms": None, "p99_tpot_ms": 20.0,
         "energy_per_token_j": None, "expert_bytes_per_request": None}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text("{not json")
    (tmp_path / "a" / "requests.parquet").write_bytes(b"garbage")
    res = load_results(tmp_path)
    assert [r.label for r in res.runs] == ["a"] and len(res.notes) == 2
    assert F.traffic_energy(res.runs) is None and F.timeline(res.runs) is None
    text = write_report(tmp_path).read_text()
    assert 'id="fig-pareto"' in text and "fig-timeline" not in text and "Skipped while loading" in text


# ---- figures -----------------------------------------------------------------------------------
def test_frontier_keeps_only_non_dominated_points() -> None:
    pts = [(10.0, 500.0), (20.0, 300.0), (15.0, 600.0), (30.0, 300.0), (40.0, 100.0)]
    assert F.frontier(pts) == [0, 1, 4]


def test_timeline_thinning_keeps_extremes_and_bound() -> None:
    n = 50_000
    rng = np.random.default_rng(0)
    it = pd.DataFrame({"start_s": np.arange(n) * 0.01, "per_iter_ms": rng.uniform(5, 10, n)})
    it.loc[12_345, "per_iter_ms"] = 900.0  # a spike above any TBT target must survive
    thin = F.thin_timeline(it, max_points=5000)
    assert len(thin) <= 5000 and 12_345 in thin.index
    assert thin["start_s"].is_monotonic_increasing


def test_timeline_divides_fast_forwarded_rows(results_dir: Path) -> None:
    run = load_results(results_dir).runs[0]
    assert run.iterations is not None and (run.iterations["iterations"] > 1).any()
    fig = F.timeline([run])
    assert fig is not None
    ys = np.concatenate([np.asarray(t.y, dtype=float) for t in fig.data if t.name != "TBT target"])
    per_iter = run.iterations["latency_s"] / run.iterations["iterations"] * 1e3
    assert ys.max() == pytest.approx(per_iter.max())


def test_capacity_min_gpus_search_plots_gpus() -> None:
    from reports.load import Capacity

    search = pd.DataFrame({"rate": [8.0] * 3, "replicas": [1, 4, 2], "gpus": [2, 8, 4],
                           "slo_attainment": [0.3, 0.99, 0.97], "meets": [False, True, True]})
    cap = Capacity(search, {"kind": "min-gpus", "found": True, "gpus": 4, "rate": 8.0}, 0.95)
    fig = F.capacity(cap)
    assert fig is not None and fig.layout.xaxis.title.text == "GPUs"
    assert sorted(fig.data[0].x) == [2, 4, 8]


# ---- HTML --------------------------------------------------------------------------------------
def test_report_is_one_offline_file(report: Path, results_dir: Path) -> None:
    assert report == results_dir / "report.html"
    text = report.read_text(encoding="utf-8")
    assert len(PLOTLY_HEADER.findall(text)) == 1
    # The capacity answer and its search come first, then the runs' summary and figures.
    assert FIG_DIV.findall(text) == ["fig-capacity", "fig-pareto", "fig-cdf", "fig-timeline",
                                     "fig-traffic-energy", "fig-slo-rate"]
    # Nothing fetched at view time: no external scripts, stylesheets, fonts or MathJax.
    assert not re.search(r"<script[^>]*\ssrc=", text, re.I)
    assert not re.search(r"<link[^>]*href=[\"']?(https?:)?//", text, re.I)
    assert "mathjax" not in text.lower().split("</script>", 1)[1]
    assert '<table id="summary"' in text and "chunked:512" in text
    assert report.stat().st_size < 8_000_000
    assert not [p for p in results_dir.iterdir() if p.name.endswith(".tmp")]


def test_report_is_deterministic(results_dir: Path, tmp_path: Path) -> None:
    a = write_report(results_dir, tmp_path / "a.html").read_bytes()
    b = write_report(results_dir, tmp_path / "sub" / "b.html").read_bytes()
    assert a == b


def test_cli(results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert report_main([str(results_dir), "--out", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)
    assert report_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "missing") in err


def test_reports_never_imports_torch(tmp_path: Path) -> None:
    code = ("import sys, reports, reports.cli, reports.figures; "
            "sys.exit(1 if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ---- headless Chromium -------------------------------------------------------------------------
# Injected first thing in <head> of a copy of the report: records uncaught errors, failed resource
# loads, promise rejections and console.error into a DOM element that --dump-dom then shows.
_HOOK = """<script>(function () {
  var errs = [];
  function rec(m) {
    errs.push(String(m));
    var el = document.getElementById('__console_errors');
    if (!el) { el = document.createElement('pre'); el.id = '__console_errors';
               (document.body || document.documentElement).appendChild(el); }
    el.textContent = JSON.stringify(errs);
  }
  window.addEventListener('error', function (e) {
    var t = e.target;
    rec(t && t !== window && (t.src || t.href) ? 'failed to load ' + (t.src || t.href)
                                               : 'uncaught: ' + e.message);
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    rec('unhandled rejection: ' + (e.reason && e.reason.stack || e.reason));
  });
  var orig = console.error;
  console.error = function () {
    rec('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return orig.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    setTimeout(function () {
      var m = document.createElement('div'); m.id = '__report_loaded'; document.body.appendChild(m);
    }, 500);
  });
})();</script>"""


class _DomScan(HTMLParser):
    """For each div with a fig-* id: did it get plotly's classes and an svg.main-svg inside?"""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.plots: dict[str, dict[str, bool]] = {}
        self._open: list[tuple[str, int]] = []  # (fig id, div depth where it opened)
        self._depth = 0
        self.errors: list[str] = []
        self.loaded = False
        self._in_errors = False
        self._err_text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if a.get("id") == "__report_loaded":
            self.loaded = True
        if tag == "pre" and a.get("id") == "__console_errors":
            self._in_errors = True
        for fig, _ in self._open:
            if tag == "svg" and "main-svg" in classes:
                self.plots[fig]["svg"] = True
        if tag == "div":
            self._depth += 1
            if a.get("id", "").startswith("fig-") and "plotly-graph-div" in classes:
                self.plots[a["id"]] = {"js": "js-plotly-plot" in classes, "svg": False}
                self._open.append((a["id"], self._depth))

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre" and self._in_errors:
            self._in_errors = False
            self.errors = json.loads(self._err_text or "[]")
        if tag == "div":
            if self._open and self._open[-1][1] == self._depth:
                self._open.pop()
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self._err_text += data


def run_chromium(page: Path, workdir: Path, *mode: str) -> tuple[str, str]:
    """Headless Chromium on page with a 1,400 x 2,000 window; mode: --dump-dom or --screenshot=PNG.
    Returns (stdout, stderr)."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--force-device-scale-factor=1", "--window-size=1400,2000",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           f"--user-data-dir={workdir / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=10000", *mode, page.as_uri()]
    # Own process group: on a hang, the browser's helper processes go down with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=workdir, env={**os.environ, "LANG": "C.UTF-8"})
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("headless Chromium did not finish within 120 s")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out, err


def _render_in_chromium(page: Path, workdir: Path) -> tuple[_DomScan, list[str]]:
    """Load page headless and return the scanned DOM and console lines Chromium logged as errors."""
    text = page.read_text(encoding="utf-8")
    probe = workdir / "probe.html"
    probe.write_text(text.replace("<head>", "<head>\n" + _HOOK, 1), encoding="utf-8")
    out, err = run_chromium(probe, workdir, "--dump-dom")
    # dbus/GPU noise is logged as ERROR too; only page console output matters here.
    console = [ln for ln in err.splitlines()
               if ("CONSOLE" in ln and ("ERROR" in ln or "Uncaught" in ln)) or "Uncaught" in ln]
    scan = _DomScan()
    scan.feed(out)
    scan.close()
    return scan, console


browser = pytest.mark.browser
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: run .ci/install_chromium.sh (Debian chromium)")


@browser
@needs_chromium
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    expected = FIG_DIV.findall(report.read_text(encoding="utf-8"))
    scan, console = _render_in_chromium(report, tmp_path)
    assert scan.loaded, "page never fired load (or the error hook did not run)"
    assert scan.errors == [], f"page errors: {scan.errors}"
    assert console == [], f"console errors: {console}"
    assert sorted(scan.plots) == sorted(expected)
    not_rendered = [k for k, v in scan.plots.items() if not (v["js"] and v["svg"])]
    assert not not_rendered, f"plots not rendered: {not_rendered}"


@browser
@needs_chromium
def test_chromium_harness_catches_errors(tmp_path: Path) -> None:
    """The harness itself: a page with a broken script must report errors, not pass silently."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    '<div id="fig-x" class="plotly-graph-div"></div>'
                    "<script>console.error('boom'); notDefined();</script></body></html>")
    scan, _ = _render_in_chromium(page, tmp_path)
    assert scan.loaded
    assert any("boom" in e for e in scan.errors) and any("notDefined" in e for e in scan.errors)
    assert scan.plots == {"fig-x": {"js": False, "svg": False}}


def test_install_script_is_safe_to_rerun() -> None:
    script = Path(__file__).parents[1] / ".ci" / "install_chromium.sh"
    assert script.is_file()
    if CHROMIUM.exists() and shutil.which("bash"):
        # With chromium present it must be a no-op that succeeds (no apt run).
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "already present" in r.stdout

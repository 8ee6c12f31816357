"""Tests for what the report says about its results: the setup header, study order, axis labels
and baselines, the capacity answer with units, the validation table, and (marked `browser`) a
screenshot in headless Chromium where the setup header and the validation table are visible."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports import figures as F
from reports import load_results, write_report
from reports.load import Run
from reports.setup import NOT_RECORDED
from reports.tables import answer_rows
from tests.test_reports import browser, needs_chromium, run_chromium

STUDY = """# layersim 9.9.1 resolved study
model: qwen3-30b-a3b
gpu: h100
tp: 2
ep: 1
replicas: 4
router: round-robin
policies: [layered, chunked:512, hybrid]
workload: azure-conv
rate: null
speed: 2
duration_s: null
num_requests: 500
seed: 7
slo_ttft_ms: 2000
slo_itl_ms: 60
profile: datasheet
dtype: fp8
"""


def _metrics(policy: str, scale: float = 1.0, **extra: Any) -> dict[str, Any]:
    return {"policy": policy, "num_requests": 500, "completed": 500, "mean_ttft_ms": 180.0 * scale,
            "p99_ttft_ms": 912.5 * scale, "mean_tpot_ms": 7.25 * scale, "p99_itl_ms": 21.91 * scale,
            "p99_e2el_ms": 14739.0 * scale, "request_throughput": 1.234, "output_throughput": 12345.6,
            "slo_attainment": 0.987, "goodput": 1.2, "energy_per_token_j": 0.0780 * scale,
            "expert_bytes_per_request": 1.44931e12 * scale, "preemptions": 12345, "gpus": 8,
            "replicas": 4, "slo_ttft_ms": 2000.0, "slo_itl_ms": 60.0, "duration_s": 3.2, **extra}


def _write_runs(root: Path, policies: list[str], mtimes: list[int] | None = None) -> None:
    for i, pol in enumerate(policies):
        d = root / pol.replace(":", "_")
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(pol, 1 + 0.02 * i)))
        if mtimes is not None:
            os.utime(d / "metrics.json", ns=(mtimes[i], mtimes[i]))


# ---- setup header ------------------------------------------------------------------------------
def test_setup_from_study_file(tmp_path: Path) -> None:
    _write_runs(tmp_path, ["chunked:512", "hybrid:512", "layered"])
    (tmp_path / "study.yaml").write_text(STUDY)
    res = load_results(tmp_path)
    s = res.setup
    assert s.get("Model") == "qwen3-30b-a3b (weights fp8)"
    assert s.get("Hardware") == "8 × h100 (tp 2, 4 replicas, round-robin router)"
    # rate: null replays a trace's own arrival times (said generically by a layersim without the rule)
    assert s.get("Workload") in (
        "azure-conv, the trace's own arrivals at 2× speed, 500 requests, seed 7",
        "azure-conv, no rate set (a trace's own arrivals, else the default rate), 500 requests, seed 7")
    assert s.get("SLO") == "TTFT ≤ 2,000 ms and per-request P99 ITL ≤ 60 ms"
    assert s.get("Profile") == "datasheet profile"
    assert s.get("layersim") == "version 9.9.1"
    assert s.sources == ("study.yaml", "metrics.json")
    # Study order, with `hybrid` matching the run that recorded its canonical name hybrid:512.
    assert [r.label for r in res.runs] == ["layered", "chunked:512", "hybrid:512"]
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert '<section id="setup">' in text and "qwen3-30b-a3b" in text and "datasheet profile" in text
    rows = text.split('<table id="summary"', 1)[1]
    assert rows.index(">layered<") < rows.index(">chunked:<wbr>512<") < rows.index(">hybrid:<wbr>512<")


def test_setup_recorded_in_metrics_and_absent(tmp_path: Path) -> None:
    """A folder whose metrics.json record the study (no study.yaml), and one recording nothing."""
    rec = tmp_path / "rec" / "layered"
    rec.mkdir(parents=True)
    (rec / "metrics.json").write_text(json.dumps(_metrics(
        "layered", model="gpt-oss-120b", gpu="h200", tp=4, workload="sharegpt", rate=6.0,
        profile_label="measured-kernel profile (vllm 0.24.0)", layersim_version="1.2.3")))
    s = load_results(tmp_path / "rec").setup
    assert s.get("Model") == "gpt-oss-120b" and s.get("Hardware").startswith("8 × h200 (tp 4")
    assert s.get("Workload") == "sharegpt, Poisson arrivals at 6 req/s, 500 requests"
    assert s.get("Profile") == "measured-kernel profile (vllm 0.24.0)"
    assert s.get("layersim") == "version 1.2.3"

    bare = tmp_path / "bare" / "x"
    bare.mkdir(parents=True)
    (bare / "metrics.json").write_text(json.dumps({"policy": "x", "mean_ttft_ms": 1.0}))
    s = load_results(tmp_path / "bare").setup
    for label in ("Model", "Hardware", "Workload", "SLO", "Profile", "layersim"):
        assert s.get(label) == NOT_RECORDED
    text = write_report(tmp_path / "bare").read_text(encoding="utf-8")
    assert text.count(f'<dd class="missing">{NOT_RECORDED}</dd>') == 6


def test_runs_in_write_order_not_alphabetical(tmp_path: Path) -> None:
    _write_runs(tmp_path, ["layered", "chunked:512", "adaptive:30"],
                mtimes=[1_000_000_000, 2_000_000_000, 3_000_000_000])
    assert [r.label for r in load_results(tmp_path).runs] == ["layered", "chunked:512", "adaptive:30"]


def test_damaged_study_file_is_noted(tmp_path: Path) -> None:
    _write_runs(tmp_path, ["layered"])
    (tmp_path / "study.yaml").write_text("model: [unclosed\n")
    res = load_results(tmp_path)
    assert any("study.yaml" in n for n in res.notes) and res.setup.get("SLO").startswith("TTFT ≤")


# ---- figures -----------------------------------------------------------------------------------
def test_log_ticks_are_labelled_in_full() -> None:
    vals, text = F.log_ticks(3.1, 140.0)
    assert text == ["3", "5", "10", "20", "30", "50", "100", "200"] and vals[0] <= 3.1
    assert F.log_ticks(0.02, 9000.0)[1] == ["0.01", "0.1", "1", "10", "100", "1,000", "10,000"]


def test_timeline_names_the_target_and_no_bare_digits() -> None:
    it = pd.DataFrame({"start_s": np.arange(50) * 0.1, "latency_s": np.linspace(0.004, 0.09, 50),
                       "prefill_tokens": [0, 512] * 25, "decode_tokens": 8})
    fig = F.timeline([Run("layered", "layered", Path("layered"), {"slo_itl_ms": 60.0}, None, it)])
    assert fig is not None
    axis = fig.layout.yaxis
    assert list(axis.ticktext) == ["3", "5", "10", "20", "30", "50", "100"]
    assert [a.text for a in fig.layout.annotations if "TBT" in a.text] == ["TBT target 60 ms"]


def test_bars_show_small_differences() -> None:
    runs = [Run(p, p, Path(p), _metrics(p, s)) for p, s in (("a", 1.0), ("b", 1.02), ("c", 0.97))]
    fig = F.traffic_energy(runs)
    assert fig is not None
    energy = fig.data[1]
    assert list(energy.text) == ["0.0780<br>baseline", "0.0796<br>+2.0%", "0.0757<br>-3.0%"]
    lo, hi = fig.layout.yaxis2.range
    assert 0 < lo < 0.0757 and "not 0" in fig.layout.yaxis2.title.text
    # Large differences keep the zero baseline.
    assert F.bar_range([1.0, 3.0]) is None and F.bar_range([100.0, 103.0]) is not None


# ---- capacity and validation -------------------------------------------------------------------
def test_capacity_answer_has_units_and_no_raw_keys(tmp_path: Path) -> None:
    answer = {"cost_per_million_tokens": 0.0551594, "energy_per_token_j": 0.046, "found": True,
              "gpus": 8, "kind": "max-rate", "rate": 13.75, "rate_per_replica": 3.4375,
              "replicas": 4, "slo_attainment": 0.921875, "target": 0.9}
    rows = dict(answer_rows(answer, 0.9))
    assert rows == {"Highest rate meeting the target":
                    "13.750 req/s (3.438 req/s per replica) on 8 GPUs (4 replicas)",
                    "SLO attainment at the answer": "92.2% (target 90.0%)",
                    "Energy": "0.0460 J per token", "Cost": "$0.055 per million tokens"}
    assert dict(answer_rows({"found": False, "kind": "min-gpus"}, 0.9)) == {
        "Answer": "no probed point met the target", "Target SLO attainment": "90.0%"}
    (tmp_path / "capacity.json").write_text(json.dumps(
        {"answer": answer, "search": [{"rate": 13.75, "slo_attainment": 0.92, "meets": True}]}))
    text = write_report(tmp_path).read_text(encoding="utf-8")
    assert "0 runs" not in text and "capacity search of 1 probe<" in text
    assert "cost_per_million_tokens" not in text.split("<body>", 1)[1].split("<figure", 1)[0]
    assert ">True<" not in text and 'id="capacity-probes"' in text


def _validation_folder(root: Path) -> Path:
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for i, pol in enumerate(("layered", "chunked:512", "hybrid:512")):  # validate's order
        for src, scale in (("engine", 1.0 + 0.1 * i), ("sim", 1.0)):
            d = root / pol.replace(":", "_") / src
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_metrics(pol, scale)))
        for metric, pred, meas, bound in (("mean_ttft_ms", 180.0, 200.0, 0.75),
                                          ("p99_itl_ms", 21.9, 35.0, None),
                                          ("request_throughput", 1.23, 1.2, 0.5),
                                          ("energy_per_token_j", 0.078, None, None),
                                          ("expert_bytes_per_request", 5.19e7, 4.86e7, 0.25)):
            err = None if meas is None else (pred - meas) / meas
            rows.append({"policy": pol, "metric": metric, "predicted": pred, "measured": meas,
                         "rel_error": err, "bound": bound,
                         "within": None if bound is None or err is None else abs(err) <= bound})
        runs[pol] = {"engine": {}, "sim": {}}
    (root / "validation.json").write_text(json.dumps({
        "model": "tiny-moe", "device": "cpu", "engine_dtype": "float32", "attention_impl": "sdpa",
        "expert_impl": "grouped_mm", "profile": "cpu.json (calibrated)", "profile_gpu": "cpu",
        "workload": "fixed 256 prompt / 8 output tokens, Poisson 2 req/s, 3 requests over 2.7 s",
        "num_requests": 3, "seed": 0, "bounds": {}, "rows": rows, "runs": runs}))
    return root


def test_validation_table_not_json(tmp_path: Path) -> None:
    res = load_results(_validation_folder(tmp_path))
    assert [r.label for r in res.runs][:3] == ["layered [engine]", "layered [sim]", "chunked:512 [engine]"]
    assert res.setup.get("Model") == "tiny-moe" and res.setup.get("Profile") == "cpu.json (calibrated)"
    assert res.setup.get("Hardware") == "8 × cpu (4 replicas)"
    text = write_report(tmp_path).read_text(encoding="utf-8")
    section = text.split('<h2 id="validation">', 1)[1].split("<figure", 1)[0]
    assert '<table id="validation-table">' in section and '"rows"' not in section
    assert "<td>200.00 ms</td>" in section and "<td>-10.0%</td>" in section
    assert "not measured" in section and "51.9 MB" in section and 'class="bad">outside' not in section
    assert 'id="fig-validation"' in text


# ---- headless Chromium: screenshot -------------------------------------------------------------
_BOXES = """<script>window.addEventListener('load', function () { setTimeout(function () {
  var out = {viewport: [window.innerWidth, window.innerHeight]};
  ['setup', 'validation-table', 'summary'].forEach(function (id) {
    var el = document.getElementById(id); if (!el) return;
    var r = el.getBoundingClientRect(), wrap = el.parentElement;
    out[id] = {x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
               scroll_w: wrap.scrollWidth, client_w: wrap.clientWidth, text: el.innerText};
  });
  var pre = document.createElement('pre'); pre.id = '__boxes';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
}, 500); });</script>"""


def read_png(path: Path) -> np.ndarray:
    """RGB(A) pixels of an 8-bit, non-interlaced PNG (what Chromium writes), as (h, w, c)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h, bpp = 8, [], 0, 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    img = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f, line = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1)
        if f in (0, 1, 2):
            img[y] = (line if f == 0 else line + prev if f == 2 else
                      np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1))
        else:  # average (3) and Paeth (4) depend on the pixel just decoded to the left
            cur, ln, up = bytearray(stride), line.tobytes(), prev.tobytes()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                c = up[i - bpp] if i >= bpp else 0
                if f == 3:
                    pred = (a + up[i]) >> 1
                else:
                    p = a + up[i] - c
                    pa, pb, pc = abs(p - a), abs(p - up[i]), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else up[i] if pb <= pc else c
                cur[i] = (ln[i] + pred) & 255
            img[y] = np.frombuffer(bytes(cur), np.uint8)
        prev = img[y]
    return img.reshape(h, w, bpp)[:, :, :3]


def _ink(img: np.ndarray, box: dict[str, float]) -> float:
    """Fraction of the box's pixels far from its most common colour (its background): text."""
    y0, x0 = int(box["y"]), int(box["x"])
    region = img[y0:y0 + int(box["h"]), x0:x0 + int(box["w"])].reshape(-1, 3).astype(int)
    colours, counts = np.unique(region, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(region - background).sum(axis=1) > 150).mean())


@browser
@needs_chromium
def test_screenshot_shows_setup_and_validation_table(tmp_path: Path) -> None:
    report = write_report(_validation_folder(tmp_path / "results"))
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", _BOXES + "</body>", 1),
                     encoding="utf-8")
    dom, _ = run_chromium(probe, tmp_path, "--dump-dom")
    boxes = json.loads(dom.split('<pre id="__boxes">', 1)[1].split("</pre>", 1)[0]
                       .replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    # Same width in both modes, so the same layout; --dump-dom's window keeps some height for chrome.
    width, height = boxes["viewport"]
    assert width == 1400 and height > 1500
    setup, table, summary = boxes["setup"], boxes["validation-table"], boxes["summary"]
    assert "tiny-moe" in setup["text"] and "TTFT ≤ 2,000 ms" in setup["text"]
    assert "cpu.json (calibrated)" in setup["text"] and "device cpu" in setup["text"]
    assert "predicted (simulator)" in table["text"] and "200.00 ms" in table["text"]
    # The summary table fits a 1,400 px window: nothing cut off, no horizontal scroll.
    assert summary["scroll_w"] <= summary["client_w"] and summary["x"] + summary["w"] <= 1400
    shot = tmp_path / "report.png"
    run_chromium(probe, tmp_path, f"--screenshot={shot}")
    img = read_png(shot)
    assert img.shape[:2] == (2000, 1400)
    for name, box in (("setup header", setup), ("validation table", table)):
        assert box["w"] > 300 and box["h"] > 100, f"{name} collapsed: {box}"
        assert box["y"] + box["h"] <= height and box["x"] + box["w"] <= 1400, f"{name} off screen"
        ink = _ink(img, box)
        assert ink > 0.01, f"{name}: no text drawn in its box ({ink:.2%} ink)"
    # The check can fail: a blank strip right of the centred page holds no ink.
    assert _ink(img, {"x": 1360, "y": 0, "w": 40, "h": 2000}) == 0

"""`layersim search` against a closed form, and its store: resume, staleness, pruning, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from costmodel import ConfigError
from search import session
from search.grid import expand, read_search
from search.pareto import front
from search.store import ProbeStore
from sim.results import check_complete
from tests.test_search_helpers import (
    PRICE,
    TOKENS,
    capacity,
    constant_profile,
    counted_fixture,  # noqa: F401 (the fixture `counted`)
    write_study,
)


def _search(study: Path, out: Path, **grid: object) -> dict:
    rc = session.run(str(study), {}, dict(grid), out=out, progress=False)
    assert rc == 0
    return json.loads((out / "search.json").read_text())



def test_closed_form_cheapest_configuration(tmp_path: Path) -> None:
    got = _search(write_study(tmp_path), tmp_path / "out")
    ranked = got["ranked"]
    assert len(ranked) == 4 and all(r["found"] for r in ranked)
    for r in ranked:  # the bisection stops within rel_tol below the service rate
        cap = capacity(r["gpu"], r["max_num_seqs"])
        assert cap * (1 - 0.05) <= r["rate_per_replica"] <= cap * 1.02, r
    # cost per req/s: price x D / seqs -> h200 seqs2 (0.0075) < h100 seqs2 (0.01) < h200 seqs1 ...
    assert [r["config"] for r in ranked] == [
        "h200 tp1 prefill-first seqs2", "h100 tp1 prefill-first seqs2",
        "h200 tp1 prefill-first seqs1", "h100 tp1 prefill-first seqs1"]
    best = ranked[0]
    gpus = -(-400 // best["rate_per_replica"])  # ceil(target / capacity)
    assert best["gpus"] == gpus == 2
    assert best["cost_per_million_tokens"] == pytest.approx(
        gpus * PRICE["h200"] / (400 * TOKENS * 3600) * 1e6)
    # ep 3 does not divide tiny-moe's 8 experts: pruned up front, with the reason
    assert len(got["pruned"]) == 4
    assert all("does not divide the 8 experts" in p["reason"] for p in got["pruned"])
    assert "h200 tp1 prefill-first seqs2" in got["fronts"]["cost_vs_p99_ttft"]
    check_complete(tmp_path / "out")  # written whole, every file listed in COMPLETE
    page = (tmp_path / "out" / "report.html").read_text()
    for part in ('id="search-ranked"', 'id="fig-front-ttft"', 'id="fig-front-energy"',
                 "does not divide the 8 experts"):
        assert part in page


def test_same_results_serial_and_pool(tmp_path: Path) -> None:
    study = write_study(tmp_path, ep=[1], max_num_seqs=[2], gpu=["h200"])
    _search(study, tmp_path / "a", store=str(tmp_path / "s1"))
    _search(study, tmp_path / "b", store=str(tmp_path / "s2"), jobs=2)
    for name in ("search.json", "search.parquet", "probes.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_rerun_skips_finished_probes(tmp_path: Path, counted: list[str]) -> None:
    study = write_study(tmp_path, ep=[1], max_num_seqs=[2])
    first = _search(study, tmp_path / "a")
    store = ProbeStore(tmp_path / "store")
    keys = store.keys()
    assert sorted(set(counted)) == keys and len(keys) == len(counted)
    counted.clear()
    lost = keys[::3]  # as if the first run had been killed before these finished
    for k in lost:
        store.path(k).unlink()
    again = _search(study, tmp_path / "b")
    assert sorted(counted) == sorted(lost)  # only what was missing ran again
    assert again == first
    probes = [(tmp_path / d / "probes.parquet").read_bytes() for d in ("a", "b")]
    assert probes[0] == probes[1]


def test_a_different_search_never_reuses_a_stale_result(tmp_path: Path, counted: list[str]) -> None:
    study = write_study(tmp_path, ep=[1], gpu=["h200"], max_num_seqs=[2])
    first = _search(study, tmp_path / "a")
    n, before = len(counted), set(ProbeStore(tmp_path / "store").keys())
    # the target steers the search, not a simulation: every probe it needs is reused
    counted.clear()
    text = study.read_text()
    study.write_text(text.replace("target: 0.9", "target: 0.5"))
    _search(study, tmp_path / "b")
    assert counted == []
    # the profile edited in place (same path, a slower server): no stored probe may be used
    study.write_text(text)
    prof = tmp_path / "h200-constant.json"
    data = json.loads(prof.read_text())
    data["iteration_overhead_s"] = 0.0125
    prof.write_text(json.dumps(data))
    counted.clear()
    slower = _search(study, tmp_path / "c")
    assert len(counted) >= n - 2 and not set(counted) & before
    rates = {r["config"]: r["rate_per_replica"] for r in slower["ranked"]}
    assert rates["h200 tp1 prefill-first seqs2"] == pytest.approx(2 / 0.0125, rel=0.05)
    assert slower["ranked"] != first["ranked"]


def test_store_keeps_whole_records_only(tmp_path: Path) -> None:
    store = ProbeStore(tmp_path)
    key = "ab" * 32
    store.put(key, {"key": key, "metrics": {"slo_attainment": 1.0}})
    assert store.get(key) == {"key": key, "metrics": {"slo_attainment": 1.0}}
    store.path(key).write_text('{"key": "ab')  # a torn write cannot happen; a damaged file
    assert store.get(key) is None                # counts as missing and is computed again
    store.path(key).write_text(json.dumps({"key": "cd" * 32, "metrics": {}}))
    assert store.get(key) is None  # a record under another key's name is not this probe
    with pytest.raises(ValueError):
        store.put(key, {"key": "other"})


def test_grid_mistakes_are_one_line(tmp_path: Path) -> None:
    study = write_study(tmp_path)
    text = study.read_text()
    study.write_text(text.replace("rel_tol: 0.05", "rel_tol: 2"))
    with pytest.raises(ConfigError, match=r"study.yaml: key 'search.rel_tol'"):
        read_search(str(study), {}, {})
    study.write_text(text.replace("rel_tol: 0.05", "rel_tl: 0.05"))
    with pytest.raises(ConfigError, match=r"key 'search.rel_tl': unknown key"):
        read_search(str(study), {}, {})
    study.write_text(text)
    with pytest.raises(ConfigError, match=r"^--seeds: "):
        read_search(str(study), {}, {"seeds": 0})
    with pytest.raises(ConfigError, match=r"^--rate: a search chooses the rate"):
        read_search(str(study), {"rate": 3.0}, {})
    base, spec = read_search(str(study), {}, {"tp": [1, 1]})
    with pytest.raises(ConfigError, match="search.tp: listed twice"):
        expand(spec, base)


def test_grid_prunes_what_does_not_fit(tmp_path: Path) -> None:
    study = write_study(tmp_path)
    base, spec = read_search(str(study), {"model": "qwen3-235b-a22b"},
                             {"gpu": ["h100"], "tp": [1, 8], "ep": [1], "max_num_seqs": [None],
                              "profile": None})
    configs, pruned = expand(spec, base)
    assert [c.label for c in configs] == ["h100 tp8 prefill-first"]
    assert len(pruned) == 1 and "does not fit" in pruned[0].reason


def test_pareto_front() -> None:
    pts = [(1, 5), (2, 3), (2, 4), (3, 3), (4, 1), (5, 2)]
    assert front(pts, lambda p: p[0], lambda p: p[1]) == [(1, 5), (2, 3), (4, 1)]


def test_profile_helper_is_constant(tmp_path: Path) -> None:
    from costmodel import CostModel, load_model
    from costmodel.profile import load_profile

    prof = load_profile(constant_profile("h100", tmp_path / "p.json"))
    cm = CostModel(load_model("tiny-moe"), prof.gpu, prof)
    assert cm.price_decodes(8, 1000).latency_s == pytest.approx(0.02, rel=1e-6)


def test_seeds_give_an_interval_ranked_at_its_low_end(tmp_path: Path) -> None:
    study = write_study(tmp_path, ep=[1], gpu=["h200"], max_num_seqs=[2], seeds=3)
    rc = session.run(str(study), {"arrival": "poisson"}, {}, out=tmp_path / "out", progress=False)
    assert rc == 0
    (r,) = json.loads((tmp_path / "out" / "search.json").read_text())["ranked"]
    per_seed = [float(v) for v in r["per_seed"].split(",")]
    assert r["seeds"] == 3 and len(set(per_seed)) > 1  # Poisson arrivals: seeds differ
    assert r["rate_per_replica_low"] < min(per_seed) <= max(per_seed) < r["rate_per_replica_high"]
    assert all(v < capacity("h200", 2) for v in per_seed)  # bursts need slack below 1/D
    assert r["conservative_rate_per_replica"] == r["rate_per_replica_low"]
    assert r["gpus"] == -(-400 // r["rate_per_replica_low"])  # sized at the low end


def test_probe_keys_change_with_the_simulator_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from search import probe
    from sim.study_file import make_study

    study = make_study({"policies": ["layered"], "rate": 1.0})
    key = probe.probe_key(study, "r" * 64, "c" * 64)
    assert key == probe.probe_key(study, "r" * 64, "c" * 64)
    monkeypatch.setattr(probe, "code_digest", lambda: "another source tree")
    assert probe.probe_key(study, "r" * 64, "c" * 64) != key

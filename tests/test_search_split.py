"""`layersim search` with split_pools: each configuration's cheapest prefill/decode split at the
target rate, against a closed form and against `layersim capacity --split-pools`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from costmodel import ConfigError
from search import session
from tests.test_search_helpers import (
    PRICE,
    TOKENS,
    counted_fixture,  # noqa: F401 (the fixture `counted`)
    write_study,
)

RATE = 250.0  # req/s: a constant server of D s per iteration and 2 sequences serves 2 / D


def _split_study(tmp: Path, **grid: object) -> Path:
    path = write_study(tmp, ep=[1], max_num_seqs=[2], target_rate=RATE, **grid)
    study = _as_split(yaml.safe_load(path.read_text()))
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _as_split(study: dict) -> dict:
    """A split search: the rate bisection's keys (which it refuses) left out."""
    study.pop("start_rate", None)
    for key in ("rel_tol", "max_probes"):
        study["search"].pop(key, None)
    return {**study, "split_pools": True}


def _search(study: Path, out: Path, **grid: object) -> dict:
    assert session.run(str(study), {}, dict(grid), out=out, progress=False) == 0
    return json.loads((out / "search.json").read_text())


def test_split_search_closed_form(tmp_path: Path, counted: list[str]) -> None:
    """One-token requests finish at the prefill worker, so the prefill pool alone decides: h100
    (20 ms, 100 req/s per worker) needs 3 prefill workers for 250 req/s, h200 (10 ms) 2; each
    with the one decode worker a pool needs. 4 h100 GPUs at $1 cost less than 3 h200 at $1.5."""
    got = _search(_split_study(tmp_path), tmp_path / "out")
    ranked = {r["config"]: r for r in got["ranked"]}
    h100, h200 = ranked["h100 tp1 prefill-first seqs2"], ranked["h200 tp1 prefill-first seqs2"]
    assert (h100["prefill_replicas"], h100["decode_replicas"], h100["gpus"]) == (3, 1, 4)
    assert (h200["prefill_replicas"], h200["decode_replicas"], h200["gpus"]) == (2, 1, 3)
    for r, gpu in ((h100, "h100"), (h200, "h200")):
        assert r["cost_per_million_tokens"] == pytest.approx(
            r["gpus"] * PRICE[gpu] / (RATE * TOKENS * 3600) * 1e6)
    assert [r["config"] for r in got["ranked"]][0] == "h100 tp1 prefill-first seqs2"
    # h100's walk: budget 2 GPUs (1P+1D), 4 (1P+2D, 1P+3D, 2P+1D, 2P+2D, then 3P+1D meets)
    probes = pd.read_parquet(tmp_path / "out" / "probes.parquet")
    walk = probes[probes.config == "h100 tp1 prefill-first seqs2"]
    assert list(zip(walk.prefill_replicas, walk.decode_replicas, strict=True)) == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1)]
    assert list(walk.meets) == [False] * 5 + [True]
    assert got["method"]["target_rate"] == RATE
    # a rerun reads every probe from the store
    counted.clear()
    again = _search(_split_study(tmp_path), tmp_path / "again")
    assert counted == [] and again["ranked"] == got["ranked"]


def test_split_search_over_seeds_and_a_decode_tp_axis(tmp_path: Path) -> None:
    got = _search(_split_study(tmp_path, gpu=["h200"], seeds=2), tmp_path / "out")
    (row,) = got["ranked"]
    assert (row["prefill_replicas"], row["decode_replicas"], row["seeds"]) == (2, 1, 2)
    # decode tp 3 does not divide tiny-moe's 8 heads: pruned, with the reason
    got = _search(_split_study(tmp_path, gpu=["h200"], decode_tp=[None, 2, 3]), tmp_path / "tp")
    rows = {r["config"]: r for r in got["ranked"]}
    assert rows["h200 tp1 prefill-first seqs2 decode-tp2"]["gpus"] == 2 * 1 + 1 * 2
    assert rows["h200 tp1 prefill-first seqs2"]["gpus"] == 3
    (pruned,) = got["pruned"]
    assert pruned["config"] == "h200 tp1 prefill-first seqs2 decode-tp3"
    assert pruned["reason"].startswith("--decode-tp 3 does not divide the 8 attention heads")


def test_split_search_finds_what_capacity_finds(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    args = ["--split-pools", "--policies", "layered", "--duration", "20",
            "--price-per-gpu-hour", "2.5"]
    assert main(["capacity", *args, "--rate", "1", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["search", *args, "--target-rate", "1", "--jobs", "0", "--store",
                 str(tmp_path / "store"), "--no-progress", "--json"]) == 0
    (got,) = json.loads(capsys.readouterr().out)["ranked"]
    assert got["config"].startswith("h100 tp2 ") and got["gpu"] == "h100"  # no gpu axis: named
    assert (got["prefill_replicas"], got["decode_replicas"], got["gpus"]) == (
        want["prefill_replicas"], want["decode_replicas"], want["gpus"])
    assert got["slo_attainment"] == pytest.approx(want["slo_attainment"])
    # both price the target rate (capacity priced the run's throughput, which its drain dilutes)
    assert got["cost_per_million_tokens"] == pytest.approx(want["cost_per_million_tokens"])


@pytest.mark.parametrize(("grid", "study", "message"), [
    ({"target_rate": None}, {"split_pools": True}, "give search.target_rate"),
    ({"replicas": [1, 2]}, {"split_pools": True}, "leave out replicas"),
    ({"decode_tp": [2]}, {}, "search.decode_tp: the decode workers' TP is an axis of a "
                             "split_pools search only"),
])
def test_split_search_mistakes(tmp_path: Path, grid: dict, study: dict, message: str) -> None:
    path = write_study(tmp_path, ep=[1], **grid)
    data = yaml.safe_load(path.read_text())
    data["search"] = {k: v for k, v in data["search"].items() if v is not None}
    path.write_text(yaml.safe_dump({**data, **study}, sort_keys=False))
    with pytest.raises(ConfigError, match=message):
        session.run(str(path), {}, {}, out=None, progress=False)


def _grid_study(tmp: Path, extra: dict, **grid: object) -> Path:
    path = write_study(tmp, **{"ep": [1], "max_num_seqs": [2], "gpu": ["h200"],
                               "target_rate": 250.0, **grid})
    data = yaml.safe_load(path.read_text())
    data.update(extra)
    if data.get("split_pools"):
        data = _as_split(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_configuration_whose_smallest_split_is_over_the_limit_is_not_found(tmp_path: Path) -> None:
    """tp 8 x ep 8: one prefill and one decode worker are 128 GPUs, over the walk's 64. The
    search used to end in a bare StopIteration; that configuration is not found, the other is."""
    path = _grid_study(tmp_path, {"split_pools": True}, tp=[1, 8], ep=[8])
    assert session.run(str(path), {}, {}, out=tmp_path / "out", progress=False) == 0
    rows = {r["config"]: r for r in json.loads((tmp_path / "out" / "search.json").read_text())["ranked"]}
    big = next(r for c, r in rows.items() if "tp8" in c)
    small = next(r for c, r in rows.items() if "tp1" in c)
    assert not big["found"] and big["splits_tried"] == 0
    assert small["found"]


def test_decode_tp_without_split_pools_is_refused(tmp_path: Path) -> None:
    """The study key decode_tp in a co-located search was ignored, yet named in every label."""
    path = _grid_study(tmp_path, {"decode_tp": 2})
    with pytest.raises(ConfigError, match="key 'decode_tp'"):
        session.run(str(path), {}, {}, out=None, progress=False)


def test_a_split_search_takes_the_study_key_workers_as_a_co_located_one_does(tmp_path: Path) -> None:
    """`workers` splits one simulation over processes and a search ignores it (its probes are
    its parallelism); a split search's probes of two pools once refused it at the first one."""
    path = _split_study(tmp_path, gpu=["h200"])
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "workers": 2}, sort_keys=False))
    (row,) = _search(path, tmp_path / "out")["ranked"]
    assert (row["prefill_replicas"], row["decode_replicas"]) == (2, 1)


def test_a_search_whose_every_walk_proposes_nothing_reports_its_end(tmp_path: Path,
                                                                    monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No probe at all (each configuration's smallest split is over the limit): the progress
    report still says every configuration is done (found by review: none was made)."""
    reports = []
    real = session._Bar.__call__

    def spy(bar, progress):  # type: ignore[no-untyped-def]
        reports.append(progress)
        real(bar, progress)
    monkeypatch.setattr(session._Bar, "__call__", spy)
    path = _grid_study(tmp_path, {"split_pools": True}, tp=[8], ep=[8])
    assert session.run(str(path), {}, {}, out=None, progress=False) == 1
    assert reports and (reports[-1].configs_done, reports[-1].configs) == (1, 1)


@pytest.mark.parametrize(("flags", "message"), [
    (["--price-per-gpu-hour", "h100=-1"], "greater than or equal to 0"),
    (["--price-per-gpu-hour", "foo=3"], "no GPU type foo"),
    (["--gpu", "h100,h200", "--price-per-gpu-hour", "h100=3"], "no price for h200"),
    (["--price-per-gpu-hour", "h100=2.5,h100=3"], "invalid float or GPU=float"),
    (["--decode-tp", "0"], "--decode-tp"),
    (["--tp", "0"], "--tp"),
    (["--rel-tol", "0.1"], "search.rel_tol steers the rate bisection"),
    (["--start-rate", "2"], "start_rate steers the rate bisection"),
    (["--gpu", "H100", "--price-per-gpu-hour", "h100=2,H100=3"], "invalid float or GPU=float"),
])
def test_grid_and_price_mistakes_are_refused_not_pruned(flags, message, capsys) -> None:  # type: ignore[no-untyped-def]
    from cli.main import main

    try:
        rc = main(["search", "--split-pools", "--target-rate", "4", "--policies", "layered",
                   "--duration", "5", "--jobs", "0", "--no-progress", *flags])
    except SystemExit as e:  # argparse's own refusal of a flag's value
        rc = e.code
    assert rc == 2 and message in capsys.readouterr().err


def test_decode_tp_equal_to_tp_is_one_configuration(tmp_path: Path) -> None:
    """decode tp 1 beside tp 1 and null (= tp): listed once, the other pruned as the same."""
    got = _search(_split_study(tmp_path, gpu=["h200"], decode_tp=[1, None]), tmp_path / "out")
    assert [r["config"] for r in got["ranked"]] == ["h200 tp1 prefill-first seqs2 decode-tp1"]
    (pruned,) = got["pruned"]
    assert pruned["config"] == "h200 tp1 prefill-first seqs2"
    assert "the same configuration as 'h200 tp1 prefill-first seqs2 decode-tp1'" in pruned["reason"]


def test_an_all_pruned_split_search_still_reads_as_one(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = _grid_study(tmp_path, {"split_pools": True}, ep=[3])  # 3 does not divide 8 experts
    assert session.run(str(path), {}, {}, out=None, as_json=True, progress=False) == 1
    method = json.loads(capsys.readouterr().out)["method"]
    assert method["capacity"].startswith("the cheapest prefill/decode split")


def test_gpu_types_are_one_whatever_their_case(tmp_path: Path) -> None:
    """gpu H100 and a price for h100 (or the other way round) name one GPU type (found by
    review: refused as a missing price)."""
    path = _split_study(tmp_path, gpu=["H200"], price_per_gpu_hour={"h200": 1.5, "H100": 1.0})
    (row,) = _search(path, tmp_path / "out")["ranked"]
    assert row["config"].startswith("h200 ") and row["cost_per_million_tokens"] is not None

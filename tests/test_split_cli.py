"""What the command line refuses or reports for prefill/decode pools and their search (found by
a user-side review): one-line errors with exit status 2, never a silently ignored setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


@pytest.mark.parametrize(("args", "message"), [
    (["compare", "--decode-tp", "1"], "--decode-tp: decode_tp applies to prefill and decode pools"),
    (["compare", "--stream-kv"], "--stream-kv: stream_kv applies to prefill and decode pools"),
    (["compare", "--kv-link-gb-per-s", "5"], "kv_link_gb_per_s applies to prefill and decode"),
    (["compare", "--decode-policy", "layered"], "decode_policy applies to prefill and decode"),
    (["capacity", "--rate", "2", "--decode-tp", "1"], "decode_tp applies to prefill and decode"),
    (["capacity", "--rate", "12", "--max-concurrency", "4"],
     "--max-concurrency: capacity sizes for an offered rate"),
    (["capacity", "--split-pools", "--rate", "12", "--max-concurrency", "4"],
     "--max-concurrency: capacity sizes for an offered rate"),
    (["search", "--max-concurrency", "4"], "--max-concurrency: a search probes offered rates"),
    (["capacity", "--split-pools", "--rate", "4", "--replicas", "2"], "which replace --replicas"),
    (["capacity", "--split-pools", "--rate", "1", "--tp", "32", "--decode-tp", "32", "--ep", "2"],
     "are over the search's 64 GPUs"),
])
def test_settings_that_do_not_apply_are_refused(args, message, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([*args, "--duration", "5"]) == 2
    out = capsys.readouterr()
    assert message in out.err and out.out == ""  # refused before anything is printed


def test_a_run_refuses_the_key_split_pools(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    study = tmp_path / "s.yaml"
    study.write_text("split_pools: true\nrate: 4\nduration_s: 5\n")
    assert main(["compare", str(study)]) == 2
    assert "split_pools: capacity and search search the pools' sizes" in capsys.readouterr().err


def test_capacity_split_json_exits_as_its_table_does_and_names_no_replica_count(capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["capacity", "--split-pools", "--policies", "layered", "--duration", "10", "--json"]
    assert main([*base, "--rate", "1", "--slo-ttft-ms", "1"]) == 1  # nothing meets
    assert json.loads(capsys.readouterr().out)["found"] is False
    assert main([*base, "--rate", "4"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["found"] and "replicas" not in answer and "rate_per_replica" not in answer


def test_capacity_split_report_says_what_was_found(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    assert main(["capacity", "--split-pools", "--policies", "layered", "--duration", "10",
                 "--rate", "4", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Fewest GPUs meeting the target" in page and "prefill + 1 decode workers" in page
    assert "Highest rate meeting the target" not in page
    assert (out / "study.yaml").read_text().startswith(
        "# the fully resolved study that produced this folder: layersim capacity study.yaml")

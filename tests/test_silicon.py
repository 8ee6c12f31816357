"""Replaying measured serving runs: which rows run, how a row becomes a study, the overhead fit."""

from __future__ import annotations

import pandas as pd
import pytest

from costmodel import ConfigError
from sim.silicon import Replay, check_protocol, fit_overhead, replay, row_study, skip_reason

ROW = {"backend": "vllm", "model_path": "meta-llama/Llama-3.1-70B", "precision": "fp8",
       "mode": "agg", "isl": 1024, "osl": 128, "batch_size": 8, "tp_size": 4, "pp_size": 1,
       "attention_dp_size": 1, "moe_tp_size": 4, "moe_ep_size": 1,
       "silicon_ttft_ms": 100.0, "silicon_tpot_ms": 10.0}


@pytest.mark.parametrize(("change", "reason"), [
    ({}, None),
    ({"mode": "disagg"}, "disaggregated"),
    ({"pp_size": 2}, "pipeline"),
    ({"attention_dp_size": 4}, "attention data parallelism"),
    ({"moe_ep_size": 4}, "expert parallelism"),
    ({"model_path": "MiniMaxAI/MiniMax-M2.5"}, "without a preset"),
])
def test_rows_are_skipped_with_their_reason(change: dict, reason: str | None) -> None:
    got = skip_reason(pd.Series({**ROW, **change}))
    assert got == reason if reason is None else reason in str(got)


def test_a_row_becomes_a_closed_loop_study() -> None:
    study = row_study(pd.Series(ROW), "h100", None)
    assert study.model == "llama-3.1-70b" and study.dtype == "fp8" and study.tp == 4
    # InferenceX's recipe: 10 requests per client, all clients at once, lengths in [0.8 L, L],
    # a server that runs at most `clients` sequences, no prefix caching, 8192-token budget
    assert study.workload == "random-legacy:1024:128:0.8" and study.max_concurrency == 8
    assert study.num_requests == 80 and study.warmup_requests == 0 and study.stagger_s is None
    assert study.max_num_seqs == 8 and study.enable_prefix_caching is False
    assert study.async_scheduling is True
    assert study.policies == ["chunked:8192"]
    # vllm bench serve against vLLM's defaults
    own = row_study(pd.Series(ROW), "h100", None, "vllm-random:0.25")
    assert own.workload == "random:1024:128:0.25" and own.max_num_seqs is None
    assert own.enable_prefix_caching is True and own.num_requests == 80
    assert own.async_scheduling is False


@pytest.mark.parametrize("protocol", ["", "inferencex:0.8", "vllm-random", "vllm-random:1",
                                      "vllm-random:x", "vllm-random:-0.1"])
def test_unknown_protocols_are_one_line_errors(protocol: str) -> None:
    with pytest.raises(ConfigError, match="is not a protocol; valid: inferencex, vllm-random:R"):
        check_protocol(protocol)
    with pytest.raises(ConfigError):
        row_study(pd.Series(ROW), "h100", None, protocol)
    skipped_only = pd.DataFrame([{**ROW, "mode": "disagg"}])  # no row reaches row_study
    with pytest.raises(ConfigError, match="is not a protocol"):
        replay(skipped_only, protocol=protocol)


def replay_row(clients: int, predicted_ms: float, measured_ms: float) -> Replay:
    return Replay(0, "vllm", "m", 1, 2, clients, 1, 1.0, measured_ms, 1.0, predicted_ms, None)


def test_overhead_fit_recovers_a_known_line() -> None:
    # residual = 0.8 ms + 0.02 ms per client, exactly
    rows = [replay_row(n, 5.0, 5.0 + 0.8 + 0.02 * n) for n in (1, 4, 16, 64)]
    iteration_s, request_s = fit_overhead(rows)
    assert iteration_s == pytest.approx(0.8e-3, rel=1e-6)
    assert request_s == pytest.approx(0.02e-3, rel=1e-6)
    with pytest.raises(ConfigError, match="at least 3"):
        fit_overhead(rows[:2])


def test_replay_out_writes_the_table_and_a_scatter_of_predicted_against_measured(
        tmp_path, capsys) -> None:
    """Two small runs (one vLLM, one SGLang) through the CLI: replay.csv holds the errors, the
    page plots each row at (measured, predicted) and says SGLang's scheduler is not modelled."""
    import base64
    import json
    import re

    import numpy as np

    from cli.main import main

    rows = [{**ROW, "model_path": "meta-llama/Llama-3.1-8B-Instruct", "precision": "bf16",
             "isl": 256, "osl": 16, "batch_size": 2, "tp_size": 1, "moe_tp_size": 1,
             "silicon_ttft_ms": 30.0, "silicon_tpot_ms": 8.0},
            {**ROW, "backend": "sglang", "model_path": "meta-llama/Llama-3.1-8B-Instruct",
             "precision": "bf16", "isl": 512, "osl": 16, "batch_size": 4, "tp_size": 1,
             "moe_tp_size": 1, "silicon_ttft_ms": 60.0, "silicon_tpot_ms": 9.0},
            {**ROW, "mode": "disagg"}]
    csv = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert main(["replay-silicon", str(csv), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "sglang: simulated with vLLM's scheduler" in out and "skipped 1:" in out
    assert "simulated 2 rows with the inferencex protocol" in out
    table = pd.read_csv(tmp_path / "out" / "replay.csv")
    assert list(table["backend"]) == ["vllm", "sglang"]
    assert table["ttft_err"].tolist() == pytest.approx(
        (table.predicted_ttft_ms / table.measured_ttft_ms - 1).tolist())
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'id="fig-silicon"' in page and "disaggregated" in page
    assert "replayed with the inferencex protocol" in page
    assert json.loads((tmp_path / "out" / "run.json").read_text())["protocol"] == "inferencex"
    spec = json.loads(re.search(r'Plotly.newPlot\(\s*"fig-silicon",\s*(\[.*?\]),\s*\{', page,
                                re.S).group(1))
    def values(v: dict | list) -> list[float]:  # plotly writes arrays as base64 typed arrays
        if isinstance(v, list):
            return [float(x) for x in v]
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()

    points = {(t["name"], t["xaxis"]): (values(t["x"]), values(t["y"]))
              for t in spec if t["mode"] == "markers"}
    # TTFT on the first axes, TPOT on the second, each row at (measured, predicted)
    for _, r in table.iterrows():
        name = f"{r.model} ({r.backend})"
        assert points[(name, "x")] == ([r.measured_ttft_ms], [pytest.approx(r.predicted_ttft_ms)])
        assert points[(name, "x2")] == ([r.measured_tpot_ms], [pytest.approx(r.predicted_tpot_ms)])


DISAGG = {**ROW, "model_path": "Qwen/Qwen3-30B-A3B", "mode": "disagg", "batch_size": float("nan"),
          "tp_size": float("nan"), "isl": 256, "osl": 16, "prefill_num_workers": 2,
          "prefill_tp_size": 2, "decode_num_workers": 1, "decode_tp_size": 4,
          "decode_batch_size": 8, "silicon_concurrency": 6}


def test_a_disaggregated_row_runs_its_pools() -> None:
    row = pd.Series(DISAGG)
    assert skip_reason(row) is None
    study = row_study(row, "h100", None)
    assert (study.prefill_replicas, study.tp, study.decode_replicas, study.decode_tp) == (2, 2, 1, 4)
    assert study.max_concurrency == 6 and study.num_requests == 60 and study.max_num_seqs == 8
    assert study.async_scheduling is False  # not modelled with disaggregation yet
    (got,) = replay(pd.DataFrame([DISAGG]))
    assert got.skipped is None and got.model == "Qwen/Qwen3-30B-A3B (disaggregated)"
    assert got.clients == 6 and got.predicted_ttft_ms and got.predicted_tpot_ms


def test_a_disaggregated_row_without_its_client_count_is_skipped() -> None:
    reason = skip_reason(pd.Series({**DISAGG, "silicon_concurrency": float("nan")}))
    assert reason is not None and "no client count" in reason


def test_a_file_with_no_row_to_simulate_exits_1(tmp_path, capsys) -> None:
    """Every row skipped (here: pipeline parallelism): nothing was compared, so not a success,
    and the reasons are still printed."""
    from cli.main import main

    csv = tmp_path / "rows.csv"
    pd.DataFrame([{**ROW, "pp_size": 2}]).to_csv(csv, index=False)
    assert main(["replay-silicon", str(csv)]) == 1
    out = capsys.readouterr().out
    assert "simulated 0 rows" in out and "pipeline parallelism" in out
    assert main(["replay-silicon", str(csv), "--json"]) == 1


def test_a_row_no_study_takes_is_skipped_not_fatal() -> None:
    """A disaggregated row with 0 prefill workers: that row is skipped with the reason, and the
    rows around it still run."""
    rows = pd.DataFrame([{**DISAGG, "prefill_num_workers": 0}, DISAGG])
    bad, good = replay(rows)
    assert bad.skipped is not None and "not a study" in bad.skipped
    assert good.skipped is None and good.predicted_tpot_ms

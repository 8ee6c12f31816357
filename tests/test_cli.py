"""The command line: output shapes, one-line errors, files written."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from sim.router import make_router


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_compare_json_has_benchmark_serving_names(capsys):
    code, out, _ = run(capsys, "compare", "--duration", "20", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["policy"] for r in rows] == ["chunked:512", "layered"]
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms",
                "mean_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput",
                "slo_attainment", "goodput", "energy_per_token_j", "energy_per_output_token_j",
                "expert_bytes_per_request", "hbm_bytes_per_request", "preemptions"):
        assert key in rows[0], key


def test_simulate_table_and_out_dir(capsys, tmp_path):
    code, out, _ = run(capsys, "simulate", "--policies", "layered:16", "--workload", "fixed:2000:20",
                       "--rate", "1", "--num-requests", "10", "--out", str(tmp_path))
    assert code == 0
    assert "layered:16" in out and "TTFT mean / p99 (ms)" in out
    assert (tmp_path / "layered_16" / "requests.parquet").is_file()
    assert (tmp_path / "layered_16" / "metrics.json").is_file()
    assert (tmp_path / "report.html").is_file()


@pytest.mark.parametrize("content,needle", [
    ("rte: 2\n", "key 'rte': unknown key"),
    ("rate: -1\n", "key 'rate'"),
    ("tp: three\n", "key 'tp'"),
    ("policies: [chunked:512, fifo]\n", "unknown policy 'fifo'"),
    ("duration_s: 0\n", "key 'duration_s'"),
    ("model: no-such-model\n", "unknown model 'no-such-model'"),
    ("workload: nowhere.csv\n", "nowhere.csv"),
    ("rate: [1\n", "not valid YAML"),
    ("dtype: int8\n", "key 'dtype': unsupported dtype 'int8' (valid: bf16, fp8"),
    ("expert_dtype: 4\n", "key 'expert_dtype'"),
    ("mxfp4_experts: true\n", "key 'mxfp4_experts': replaced by expert_dtype"),
])
def test_study_file_errors_are_one_line(capsys, tmp_path, content, needle):
    study = tmp_path / "study.yaml"
    study.write_text(content)
    code, out, err = run(capsys, "compare", str(study))
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_flags_override_the_study_file(capsys, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("policies: [layered]\nduration_s: 10\nrate: 0.5\n")
    code, out, _ = run(capsys, "compare", str(study), "--policies", "chunked:256", "--json")
    assert code == 0
    assert json.loads(out.splitlines()[0])["policy"] == "chunked:256"


def test_explain_json_and_errors(capsys):
    code, out, _ = run(capsys, "explain", "--model", "qwen3-30b-a3b", "--gpu", "h100", "--tp", "2",
                       "--decode", "32", "--context", "4096", "--prefill", "512",
                       "--prefill-layers", "0:3", "--json")
    assert code == 0
    cost = json.loads(out)
    assert set(cost) >= {"latency_s", "energy_j", "flops", "hbm_bytes", "experts_touched_per_layer", "ops"}
    assert "expert_weights" in cost["hbm_bytes"]
    assert len(cost["experts_touched_per_layer"]) == 48
    assert cost["experts_touched_per_layer"][0] > cost["experts_touched_per_layer"][10] > 0
    code, _, err = run(capsys, "explain", "--prefill", "10", "--prefill-layers", "5:2")
    assert code == 2 and "--prefill-layers 5:2" in err
    code, _, err = run(capsys, "explain", "--decode", "4", "--tp", "3")
    assert code == 2 and "does not divide" in err


def test_routers_pick_by_their_rule():
    class Rep:
        def __init__(self, outstanding, pending):
            self.outstanding, self.pending_tokens = outstanding, pending

    reps = [Rep(3, 100), Rep(1, 900), Rep(2, 50)]
    assert [make_router("round-robin").pick(reps) for _ in range(1)] == [0]
    rr = make_router("round-robin")
    assert [rr.pick(reps) for _ in range(4)] == [0, 1, 2, 0]
    assert make_router("least-outstanding").pick(reps) == 1
    assert make_router("jsq-tokens").pick(reps) == 2
    p2 = make_router("power-of-two", seed=0)
    picks = [p2.pick(reps) for _ in range(50)]
    assert 0 not in picks  # replica 0 is the busiest: it loses every pairing
    with pytest.raises(Exception, match="unknown router"):
        make_router("random")


def test_shipped_study_file_runs(capsys):
    code, out, _ = run(capsys, "compare", "examples/study.yaml", "--duration", "10", "--json")
    assert code == 0
    assert [json.loads(x)["policy"] for x in out.strip().splitlines()] == [
        "chunked:512", "layered", "layered:4", "hybrid:512", "adaptive:30"]

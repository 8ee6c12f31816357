"""Every result table ends with how far its profile's predictions were from measurements it was
not fitted to, or says that nothing measured backs them."""

from __future__ import annotations

import pytest

from costmodel import default_profile, load_gpu
from costmodel.profile import Profile

HELD = {"rows": 162, "ttft_median_abs_err": 0.404, "ttft_p90_abs_err": 0.586,
        "tpot_median_abs_err": 0.0951, "tpot_p90_abs_err": 0.325}


def _profile(**fit_errors: object) -> Profile:
    base = default_profile(load_gpu("h100"))
    return base.model_copy(update={"fit_errors": fit_errors,
                                   "provenance": {**base.provenance, "calibrated": True}})


def test_fitted_engine_and_energy_errors_are_stated_with_their_source() -> None:
    line = _profile(engine_overhead={"held_out": HELD, "file": "runs.csv"},
                    energy={"held_out": {"rows": 9, "median_rel_err": 0.2, "p90_rel_err": 0.33},
                            "source": "fitted to NVML power"}).accuracy_line()
    assert line == ("error against measurements: mean TTFT 40% (median; p90 59%), mean TPOT 10% "
                    "(p90 32%) on 162 held-out measured vLLM runs (runs.csv); energy 20% (p90 33%) "
                    "on held-out measured power")


def test_transferred_fits_are_a_guess_here_and_say_where_they_were_measured() -> None:
    line = _profile(engine_overhead={"held_out": HELD, "file": "runs.csv", "transferred_from": "h200"},
                    energy={"held_out": {"rows": 9, "median_rel_err": 0.2, "p90_rel_err": 0.33},
                            "source": "fitted to H200 NVML power, transferred"}).accuracy_line()
    assert line == ("error against measurements: engine overhead not measured on h100 but "
                    "transferred from h200 (a guess here); on h200: mean TTFT 40% (median; p90 "
                    "59%), mean TPOT 10% (p90 32%) on 162 held-out measured vLLM runs (runs.csv); "
                    "energy fitted to another GPU's measured power and transferred (a guess here; "
                    "held-out error there 20% (p90 33%))")


@pytest.mark.parametrize("fit_errors", [
    {"engine_overhead": {"held_out": {"rows": 3}}},
    {"engine_overhead": {"held_out": {**HELD, "ttft_p90_abs_err": None}}},
    {"engine_overhead": None, "energy": "x"},
    {"engine_overhead": {"held_out": None}, "energy": {"held_out": {"rows": 2}}},
    {"engine_overhead": {"held_out": {**HELD, "rows": True}}},
    {"energy": {"held_out": {"median_rel_err": float("nan"), "p90_rel_err": 0.3}}},
])
def test_partial_or_hand_written_fit_records_read_as_unknown(fit_errors: dict) -> None:
    assert _profile(**fit_errors).accuracy_line() == (
        "error against measurements: no measured serving runs (the engine's own time is a "
        "guess); energy a datasheet guess")


def test_energy_measured_on_this_gpu_says_its_error_is_in_sample() -> None:
    p = _profile()
    p = p.model_copy(update={"provenance": {**p.provenance, "energy": {
        "measured": True, "median_rel_err": 0.07, "worst_rel_err": 0.2}}})
    assert p.accuracy_line().endswith("energy fitted to this GPU's measured power, 7% median "
                                      "error on the windows it was fitted to (no held-out figure)")


def test_what_no_measurement_backs_is_called_a_guess() -> None:
    assert _profile().accuracy_line() == ("error against measurements: no measured serving runs "
                                          "(the engine's own time is a guess); energy a datasheet "
                                          "guess")
    datasheet = default_profile(load_gpu("h100"))
    assert "datasheet peaks and guessed efficiencies (a guess)" in datasheet.accuracy_line()


def test_compare_and_capacity_print_the_shipped_profiles_line(capsys) -> None:
    from cli.main import main
    from costmodel import resolve_profile

    want = resolve_profile("h100", None).accuracy_line()
    assert "held-out measured vLLM runs" in want  # the shipped H100 profile has the fit
    assert main(["compare", "--workload", "fixed:64:8", "--rate", "2", "--num-requests", "6",
                 "--policies", "chunked:512"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n")[-1] == want
    assert main(["compare", "--profile", "datasheet", "--workload", "fixed:64:8", "--rate", "2",
                 "--num-requests", "6", "--policies", "chunked:512"]) == 0
    assert capsys.readouterr().out.rstrip("\n").endswith("guessed efficiencies (a guess)")
    assert main(["capacity", "--workload", "fixed:64:8", "--duration", "20", "--policies",
                 "chunked:512"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n")[-1] == want



def test_the_line_ends_a_failed_capacity_search_and_never_enters_json(capsys) -> None:
    import json

    from cli.main import main
    from costmodel import resolve_profile

    want = resolve_profile("h100", None).accuracy_line()
    assert main(["capacity", "--tp", "1", "--workload", "fixed:64:8", "--num-requests", "20",
                 "--slo-ttft-ms", "0.01", "--policies", "chunked:512"]) == 1
    out = capsys.readouterr().out.rstrip("\n").split("\n")
    assert out[-2].startswith("no point met the target") and out[-1] == want
    assert main(["compare", "--workload", "fixed:64:8", "--rate", "2", "--num-requests", "6",
                 "--policies", "chunked:512,layered", "--json"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and all(isinstance(json.loads(line), dict) for line in lines)


def test_explain_ends_with_the_line(capsys) -> None:
    from cli.main import main
    from costmodel import resolve_profile

    assert main(["explain", "--decode", "4", "--gpu", "h200"]) == 0
    assert capsys.readouterr().out.rstrip("\n").split("\n")[-1] == (
        resolve_profile("h200", None).accuracy_line())

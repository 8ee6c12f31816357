"""Issue 13's small ones: early --out checks, the no-GPU message, progress in logs, Ctrl-C, and
module:Class policies from the current folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.main import main


def test_calibrate_checks_out_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "profile.json"
    start = time.process_time()
    assert main(["calibrate", "--device", "cpu", "--quick", "--out", str(missing)]) == 2
    assert time.process_time() - start < 5  # refused at once, not after a calibration
    err = capsys.readouterr().err
    assert "does not exist" in err and ".tmp" not in err


def test_calibrate_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["calibrate", "--gpu", "0"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "nvidia-ml-py" not in err


def test_progress_in_a_log_names_the_policy_without_carriage_returns(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "--duration", "6", "--policies", "chunked:512,layered"]) == 0
    err = capsys.readouterr().err  # not a terminal here
    assert "\r" not in err
    assert "simulating chunked:512: 100%" in err and "simulating layered: 100%" in err


def test_interrupt_writes_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import cli.simulate

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.simulate, "run_study", interrupted)
    out = tmp_path / "r"
    assert main(["compare", "--duration", "5", "--out", str(out)]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists()


def test_module_policy_loads_from_the_current_folder(tmp_path: Path) -> None:
    (tmp_path / "mypolicies.py").write_text(
        "from policies import ChunkedPrefill\n\n\nclass Big(ChunkedPrefill):\n"
        "    def __init__(self) -> None:\n        super().__init__(2048)\n        self.name = 'big'\n")
    layersim = Path(sys.executable).parent / "layersim"
    if not layersim.exists():
        pytest.skip("the layersim console script is not installed next to this Python")
    done = subprocess.run([str(layersim), "compare", "--duration", "5", "--policies",
                           "mypolicies:Big"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "big" in done.stdout


def test_validate_out_is_a_results_folder_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["validate", "--num-requests", "2", "--out", str(foreign)]) == 2
    assert "not a layersim results folder" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"

"""The experiment-throughput benchmark end to end, smallest size: every mode
runs real clusters (Redis + the four service processes on the shipped tiny
model), every experiment finishes, and the JSON report has the documented
shape. No timing is asserted: the numbers belong to the benchmark's note."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "load_tests" / "experiment_throughput.py"
BENCHMARK_TIMEOUT_S = 540  # the script's own bound; pytest's is above it
RESULT_KEYS = {
    "mode", "n", "experiments", "finished", "all_finished", "wall_s", "experiments_per_hour",
    "throughput_ratio_vs_serial_warm", "throughput_ratio_vs_serial_cold", "mean_experiment_s", "mean_run_s",
    "first_rollout_s", "rollout_step_s", "train_step_s", "trainer_busy_s", "rollout_busy_s",
    "trainer_busy_fraction", "rollout_busy_fraction", "final_accuracy_mean", "final_accuracy_std",
    "start_accuracy_mean", "bottleneck",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(BENCHMARK_TIMEOUT_S + 60)
def test_quick_run_finishes_every_experiment_in_every_mode(tmp_path):
    benchmark = _load_script()
    json_path, plot_dir = tmp_path / "throughput.json", tmp_path / "plots"
    exit_code = benchmark.main(["--quick", "--steps", "1", "--eval-size", "8", "--json", str(json_path),
                                "--plot-dir", str(plot_dir), "--data-dir", str(tmp_path / "data"),
                                "--timeout-s", str(BENCHMARK_TIMEOUT_S)])
    report = json.loads(json_path.read_text())
    assert report["error"] is None
    assert exit_code == 0

    assert report["settings"]["experiments"] == 2 and report["settings"]["steps"] == 1
    rows = report["results"]
    assert [(r["mode"], r["n"]) for r in rows] == [("serial-warm", 1), ("serial-cold", 1),
                                                  ("concurrent", 1), ("concurrent", 2)]
    for row in rows:
        assert RESULT_KEYS <= set(row), RESULT_KEYS - set(row)
        assert row["all_finished"] and row["finished"] == row["experiments"] == 2
        assert row["throughput_ratio_vs_serial_warm"] is not None
        assert row["throughput_ratio_vs_serial_cold"] is not None
        assert row["final_accuracy_mean"] is not None and row["start_accuracy_mean"] is not None
        assert row["rollout_step_s"] is not None and row["train_step_s"] is not None
        assert row["completions"] > 0  # the busy time came from real completions
    assert rows[0]["throughput_ratio_vs_serial_warm"] == pytest.approx(1.0)

    for key, outcomes in report["experiments"].items():
        assert [o["status"] for o in outcomes] == ["finished", "finished"], key
        assert all(o["steps_done"] == 1 and len(o["train_step_s"]) == 1 for o in outcomes), key
        assert len({o["seed"] for o in outcomes}) == 2
    cold = report["experiments"]["serial-cold:1"]
    assert all(o["startup_s"] > 0 for o in cold)  # the cold start is charged to each experiment
    assert (plot_dir / "throughput.png").stat().st_size > 0
    assert (plot_dir / "step_times.png").stat().st_size > 0

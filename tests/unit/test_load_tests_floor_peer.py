"""The floor's and the TRL peer's pure parts (no model, no TRL, no processes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

LOAD_TESTS = Path(__file__).resolve().parents[2] / "load_tests"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, LOAD_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


floor = _load("floor")
peer_trl = _load("peer_trl")


def test_floor_row_per_step_figures():
    run = floor.FloorRun(n=8, experiments=8, steps_done=80, wall_s=8.0, cpu_s=6.4, peak_rss_mb=500.0,
                         start_accuracies=[0.2, 0.3], final_accuracies=[0.5, 0.7], skipped_updates=1)
    row = floor.floor_row(run)
    assert row["mode"] == "interleaved" and row["experiments_per_hour"] == pytest.approx(3600.0)
    assert row["cpu_s_per_step"] == pytest.approx(0.08) and row["wall_s_per_step"] == pytest.approx(0.1)
    assert row["cores_busy"] == pytest.approx(0.8)
    assert row["final_accuracy_mean"] == pytest.approx(0.6) and row["start_accuracy_mean"] == pytest.approx(0.25)
    serial = floor.floor_row(floor.FloorRun(n=1, experiments=1, steps_done=0, wall_s=0.0, cpu_s=0.0, peak_rss_mb=1.0))
    assert serial["mode"] == "serial" and serial["experiments_per_hour"] == 0.0
    assert serial["final_accuracy_mean"] is None
    assert floor.floor_table([row, serial]).splitlines()[1].split()[:3] == ["interleaved", "8", "8"]
    assert [floor.experiments_for(n, 8) for n in (1, 32)] == [8, 32]


def test_floor_specs_match_the_benchmark_specs():
    specs = floor.floor_specs(3, "add", {"steps": 2, "eval_size": 4}, seed=5, tag="f8")
    assert [s.experiment_id for s in specs] == ["tp-f8-0", "tp-f8-1", "tp-f8-2"]
    assert [s.seed for s in specs] == [5, 6, 7] and {s.steps for s in specs} == {2}


def test_peer_summary_counts_process_start_or_not():
    experiments = [
        {"process_s": 10.0, "warm_s": 4.0, "import_s": 5.0, "train_s": 2.0, "start_accuracy": 0.2,
         "final_accuracy": 0.5},
        {"process_s": 8.0, "warm_s": 2.0, "import_s": 5.0, "train_s": 1.0, "start_accuracy": 0.2,
         "final_accuracy": 0.7},
    ]
    summary = peer_trl.peer_summary(experiments, "1.16.0")
    assert summary["experiments_per_hour"] == pytest.approx(3600.0 * 2 / 18.0)
    assert summary["experiments_per_hour_warm"] == pytest.approx(3600.0 * 2 / 6.0)
    assert summary["mean_process_start_s"] == pytest.approx(6.0)
    assert summary["final_accuracy_mean"] == pytest.approx(0.6) and summary["final_accuracy_std"] == pytest.approx(0.1)
    assert summary["trl_version"] == "1.16.0" and summary["finished"] == 2
    failed = peer_trl.peer_summary([{"process_s": 3.0, "warm_s": 0.0, "final_accuracy": None}], None)
    assert failed["finished"] == 0 and failed["experiments_per_hour"] == 0.0 and failed["final_accuracy_mean"] is None
    assert "1/2" not in peer_trl.peer_table(summary) and "2/2" in peer_trl.peer_table(summary)

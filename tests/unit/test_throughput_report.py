"""The experiment-throughput benchmark's pure parts: flags, per-experiment
outcomes, aggregation, ratios and the busy-time union (no cluster, no I/O)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import msgspec
import pytest

from services.scheduler.state import ExperimentRecord
from shared.messages import StepMetrics

SCRIPT = Path(__file__).resolve().parents[2] / "load_tests" / "experiment_throughput.py"
ADVICE = (("sub", "add"), {"steps": 20, "prompts_per_step": 8, "group_size": 8, "max_tokens": 8, "eval_size": 64})


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


tp = _load_script()


def metrics(step: int, rollout_s: float, train_s: float, ts: float, reward: float = 0.5) -> StepMetrics:
    return StepMetrics(experiment_id="e", step=step, adapter_version=step + 1, reward_mean=reward, accuracy=reward,
                       rollout_s=rollout_s, train_s=train_s, ts=ts)


def record(status: str = "finished", **fields) -> ExperimentRecord:
    base = dict(experiment_id="e", status=status, steps=2, step=2, submitted_at=100.5, started_at=101.0,
                finished_at=110.0, first_scored_at=102.0, start_accuracy=0.25, final_accuracy=0.5)
    return ExperimentRecord(**{**base, **fields})


# ---------------------------------------------------------------- flags


def test_defaults_follow_the_demo_advice_and_the_issue():
    settings = tp.parse_args([], demo_advice=ADVICE)
    assert (settings.experiments, settings.steps, settings.concurrency) == (8, 10, (1, 2, 4, 8))
    assert settings.modes == ("serial-warm", "serial-cold", "concurrent")
    assert settings.family == "sub"  # the first family the tiny model recommends
    assert settings.spec_fields["steps"] == 10 and settings.spec_fields["eval_size"] == 64
    assert settings.env == {} and not settings.gpu and settings.warmup
    assert not tp.parse_args(["--no-warmup"], demo_advice=ADVICE).warmup


def test_without_advice_the_family_is_add():
    assert tp.parse_args([], demo_advice=((), {})).family == "add"


def test_quick_is_a_small_smoke_run_and_explicit_flags_win():
    quick = tp.parse_args(["--quick"], demo_advice=ADVICE)
    assert (quick.experiments, quick.steps, quick.concurrency, quick.spec_fields["eval_size"]) == (2, 2, (1, 2), 16)
    custom = tp.parse_args(["--quick", "--steps", "1", "--eval-size", "4", "--experiments", "3", "--family", "add"],
                           demo_advice=ADVICE)
    assert (custom.experiments, custom.steps, custom.spec_fields["steps"],
            custom.spec_fields["eval_size"]) == (3, 1, 1, 4)
    assert custom.family == "add"


def test_gpu_preset_sets_cuda_env_and_longer_generations():
    settings = tp.parse_args(["--gpu", "--engine", "vllm"], demo_advice=ADVICE)
    assert settings.env["CLORA_DEVICE"] == "cuda" and settings.env["CLORA_DTYPE"] == "bfloat16"
    assert settings.env["CLORA_ENGINE"] == "vllm"
    assert settings.spec_fields["max_tokens"] == 128 and settings.steps == 5


def test_model_dir_goes_to_the_services_as_an_absolute_path(tmp_path):
    settings = tp.parse_args(["--model-dir", str(tmp_path)], demo_advice=ADVICE)
    assert settings.env["CLORA_MODEL_DIR"] == str(tmp_path.resolve())


def test_concurrency_and_modes_parsing():
    assert tp.parse_concurrency("8,1,2,2") == (1, 2, 8)
    for bad in ("0,2", "a", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            tp.parse_concurrency(bad)
    assert tp.parse_modes("concurrent,serial-warm") == ("serial-warm", "concurrent")
    with pytest.raises(argparse.ArgumentTypeError):
        tp.parse_modes("serial,concurrent")


def test_specs_differ_only_in_id_and_seed():
    settings = tp.parse_args(["--experiments", "3", "--seed", "10"], demo_advice=ADVICE)
    specs = tp.experiment_specs(settings, "c4")
    assert [s.experiment_id for s in specs] == ["tp-c4-0", "tp-c4-1", "tp-c4-2"]
    assert [s.seed for s in specs] == [10, 11, 12]
    stripped = {msgspec.json.encode(msgspec.structs.replace(s, experiment_id="x", seed=0)) for s in specs}
    assert len(stripped) == 1
    assert specs[0].task.family == "sub" and specs[0].steps == 10


# ---------------------------------------------------------------- busy time


def test_union_counts_overlaps_once():
    assert tp.union_seconds([]) == 0.0
    assert tp.union_seconds([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)
    assert tp.union_seconds([(0, 10), (2, 3), (4, 5)]) == pytest.approx(10.0)
    assert tp.union_seconds([(3, 3), (1, 2)]) == pytest.approx(1.0)  # empty intervals count nothing


def test_completion_interval_ends_at_the_stream_entry_time():
    start, end = tp.completion_interval("1000500-3", time_to_first_token_s=0.2, decode_s=0.3)
    assert (start, end) == (pytest.approx(1000.0), pytest.approx(1000.5))


# ---------------------------------------------------------------- outcomes


def test_outcome_of_a_finished_experiment():
    steps = [metrics(0, 1.0, 0.1, 104.0), metrics(1, 2.0, 0.3, 107.0, reward=0.75)]
    outcome = tp.experiment_outcome("e", 3, submitted_at=100.0, record=record(), metrics=steps)
    assert outcome.status == "finished" and outcome.seed == 3
    assert outcome.wall_s == pytest.approx(10.0) and outcome.run_s == pytest.approx(9.0)
    assert outcome.first_rollout_s == pytest.approx(2.0)
    assert outcome.rollout_step_s == [1.0, 2.0] and outcome.train_step_s == [0.1, 0.3]
    assert outcome.step_wall_s == pytest.approx(3.0)  # (107 - 101) / 2
    assert (outcome.reward_first, outcome.reward_last) == (0.5, 0.75)


def test_cold_start_is_charged_to_the_experiment():
    outcome = tp.experiment_outcome("e", 0, 100.0, record(), [metrics(0, 1.0, 0.1, 104.0)], startup_s=7.0)
    assert outcome.wall_s == pytest.approx(17.0) and outcome.first_rollout_s == pytest.approx(9.0)
    assert outcome.run_s == pytest.approx(9.0)  # admission -> finished stays the service time


def test_first_rollout_falls_back_to_the_first_metrics():
    outcome = tp.experiment_outcome("e", 0, 100.0, record(first_scored_at=None), [metrics(0, 1.0, 0.5, 104.0)])
    assert outcome.first_rollout_s == pytest.approx(3.5)


def test_unfinished_or_unknown_experiments_have_no_wall_time():
    running = tp.experiment_outcome("e", 0, 100.0, record(status="running", finished_at=None), [])
    assert running.wall_s is None and running.status == "running"
    unknown = tp.experiment_outcome("e", 0, 100.0, None, [])
    assert unknown.status == "unknown" and unknown.steps_done == 0 and unknown.first_rollout_s is None


# ---------------------------------------------------------------- aggregation


def outcome(final: float | None, wall_s: float = 10.0, status: str = "finished", train=(0.5, 0.5), rollout=(1.0, 3.0)):
    return tp.ExperimentOutcome(
        experiment_id="e", seed=0, status=status, steps_done=2, steps_total=2, wall_s=wall_s, run_s=wall_s - 1,
        first_rollout_s=2.0, startup_s=0.0, start_accuracy=0.2, final_accuracy=final, rollout_step_s=list(rollout),
        train_step_s=list(train), step_wall_s=4.0, reward_first=0.1, reward_last=0.2, finished_at=200.0)


def test_summary_of_a_mode():
    run = tp.ModeRun("concurrent", 2, wall_s=36.0, outcomes=[outcome(0.4, 10.0), outcome(0.6, 20.0)],
                     rollout_busy_s=30.0)
    row = tp.summarize_mode(run)
    assert row["experiments_per_hour"] == pytest.approx(200.0)
    assert row["mean_experiment_s"] == pytest.approx(15.0)
    assert row["rollout_step_s"] == pytest.approx(2.0) and row["train_step_s"] == pytest.approx(0.5)
    assert row["trainer_busy_s"] == pytest.approx(2.0) and row["trainer_busy_fraction"] == pytest.approx(2 / 36)
    assert row["rollout_busy_fraction"] == pytest.approx(30 / 36) and row["bottleneck"] == "rollout"
    assert row["final_accuracy_mean"] == pytest.approx(0.5) and row["final_accuracy_std"] == pytest.approx(0.1)
    assert (row["final_accuracy_min"], row["final_accuracy_max"]) == (0.4, 0.6)
    assert row["start_accuracy_mean"] == pytest.approx(0.2)
    assert row["all_finished"] and row["finished"] == 2


def test_failed_experiments_do_not_count_as_throughput():
    run = tp.ModeRun("serial-warm", 1, 3600.0, [outcome(0.5), outcome(None, status="failed")], rollout_busy_s=0.0)
    row = tp.summarize_mode(run)
    assert row["experiments_per_hour"] == pytest.approx(1.0)
    assert not row["all_finished"] and row["final_accuracy_mean"] == pytest.approx(0.5)
    assert tp.summarize_mode(tp.ModeRun("serial-cold", 1, 0.0, [], 0.0))["experiments_per_hour"] == 0.0


def test_bottleneck_names_the_busiest_service_above_the_threshold():
    assert tp.bottleneck({"trainer_busy_fraction": 0.95, "rollout_busy_fraction": 0.9}) == "trainer"
    assert tp.bottleneck({"trainer_busy_fraction": 0.3, "rollout_busy_fraction": 0.85}) == "rollout"
    assert tp.bottleneck({"trainer_busy_fraction": 0.3, "rollout_busy_fraction": 0.5}) == "neither"
    assert tp.bottleneck({"trainer_busy_fraction": None, "rollout_busy_fraction": None}) == "neither"


def test_ratios_against_both_serial_baselines():
    rows = [{"mode": "serial-warm", "experiments_per_hour": 100.0},
            {"mode": "serial-cold", "experiments_per_hour": 50.0},
            {"mode": "concurrent", "experiments_per_hour": 300.0}]
    tp.add_throughput_ratios(rows)
    assert rows[2]["throughput_ratio_vs_serial_warm"] == pytest.approx(3.0)
    assert rows[2]["throughput_ratio_vs_serial_cold"] == pytest.approx(6.0)
    assert rows[0]["throughput_ratio_vs_serial_warm"] == pytest.approx(1.0)
    only = tp.add_throughput_ratios([{"mode": "concurrent", "experiments_per_hour": 3.0}])
    assert only[0]["throughput_ratio_vs_serial_warm"] is None and only[0]["throughput_ratio_vs_serial_cold"] is None


def test_table_has_one_line_per_mode_and_the_ratios():
    rows = tp.add_throughput_ratios([
        tp.summarize_mode(tp.ModeRun("serial-warm", 1, 36.0, [outcome(0.5)], 10.0)),
        tp.summarize_mode(tp.ModeRun("concurrent", 8, 12.0, [outcome(0.5)], 10.0)),
    ])
    lines = tp.results_table(rows).splitlines()
    assert len(lines) == 3 and lines[0].startswith("MODE")
    assert "serial-warm" in lines[1] and "1.00x" in lines[1]
    assert lines[2].split()[:2] == ["concurrent", "8"] and "3.00x" in lines[2]


def test_report_cleaning_turns_non_finite_numbers_into_null():
    assert tp._clean({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


def test_set_passes_extra_service_environment():
    settings = tp.parse_args(["--set", "CLORA_TORCH_THREADS=2", "--set", "CLORA_MAX_ROWS=128"], demo_advice=ADVICE)
    assert settings.env == {"CLORA_TORCH_THREADS": "2", "CLORA_MAX_ROWS": "128"}
    with pytest.raises(SystemExit):
        tp.parse_args(["--set", "CLORA_TORCH_THREADS"], demo_advice=ADVICE)


def test_process_cpu_is_read_from_proc_and_differenced_per_process():
    import os

    before = tp.process_cpu_s(os.getpid())
    sum(i * i for i in range(300_000))  # burn some CPU
    after = tp.process_cpu_s(os.getpid())
    assert before is not None and after >= before
    assert tp.process_cpu_s(None) is None and tp.process_cpu_s(2 ** 31 - 1) is None
    assert tp.cpu_used({"a": 1.0, "b": 2.0}, {"a": 1.5, "c": 9.0}) == {"a": 0.5}
    assert tp.add_cpu_used({"a": 0.5}, {"a": 0.25, "b": 1.0}) == {"a": 0.75, "b": 1.0}


def test_cpu_per_step_and_the_cpu_bound_against_serial_warm():
    warm = tp.ModeRun("serial-warm", 1, 10.0, [outcome(0.5)], 1.0, cpu_s={"trainer": 4.0, "rollout": 6.0})
    busy = tp.ModeRun("concurrent", 8, 4.0, [outcome(0.5)], 1.0, cpu_s={"trainer": 4.0, "rollout": 4.0})
    rows = tp.add_cpu_bounds(tp.add_throughput_ratios([tp.summarize_mode(warm), tp.summarize_mode(busy)]), cores=2)
    steps = rows[0]["steps_done"]
    assert rows[1]["cpu_s_per_step"] == {"rollout": pytest.approx(4.0 / steps), "trainer": pytest.approx(4.0 / steps)}
    assert rows[1]["cores_busy"] == pytest.approx(2.0)
    # serial-warm takes 10 s of wall per 'steps' steps; concurrent spends 8 CPU s per 'steps' steps on 2 cores.
    assert rows[1]["cpu_bound_ratio_vs_serial_warm"] == pytest.approx(10.0 / (8.0 / 2))
    assert rows[0]["cpu_bound_ratio_vs_serial_warm"] == pytest.approx(10.0 / (10.0 / 2))
    lines = tp.cpu_table(rows).splitlines()
    assert "ROLLOUT CPU/STEP S" in lines[0] and lines[2].split()[-1] == "2.50x"
    no_cpu = tp.summarize_mode(tp.ModeRun("serial-cold", 1, 1.0, [outcome(0.5)], 0.0))
    assert no_cpu["cores_busy"] is None and tp.add_cpu_bounds([no_cpu], 2)[0]["cpu_bound_ratio_vs_serial_warm"] is None


# ---------------------------------------------------------------- issue 19: floor, CPU bound, peer, growth


def test_floor_and_peer_flags():
    settings = tp.parse_args(["--floor", "--peer", "trl", "--concurrency", "1,2,4,8,16,32"], demo_advice=ADVICE)
    assert settings.floor and settings.peer == "trl" and settings.concurrency == (1, 2, 4, 8, 16, 32)
    assert not tp.parse_args([], demo_advice=ADVICE).floor and tp.parse_args([], demo_advice=ADVICE).peer is None
    with pytest.raises(SystemExit):
        tp.parse_args(["--peer", "nope"], demo_advice=ADVICE)


def test_a_concurrent_mode_runs_at_least_n_experiments():
    assert [tp.experiments_for(n, 8) for n in (1, 8, 16, 32)] == [8, 8, 16, 32]
    settings = tp.parse_args(["--experiments", "2"], demo_advice=ADVICE)
    assert [s.seed for s in tp.experiment_specs(settings, "c4", tp.experiments_for(4, 2))] == [0, 1, 2, 3]


def test_fraction_of_the_cpu_bound_for_concurrent_modes():
    warm = tp.ModeRun("serial-warm", 1, 10.0, [outcome(0.5)], 1.0, cpu_s={"trainer": 4.0, "rollout": 6.0})
    busy = tp.ModeRun("concurrent", 8, 4.0, [outcome(0.5)], 1.0, cpu_s={"trainer": 4.0, "rollout": 4.0})
    rows = tp.add_cpu_bounds(tp.add_throughput_ratios([tp.summarize_mode(warm), tp.summarize_mode(busy)]), cores=2)
    # 2.5x faster than serial-warm against a bound of 2.5x: all the machine allows
    assert rows[1]["fraction_of_cpu_bound"] == pytest.approx(2.5 / 2.5)
    assert rows[0]["fraction_of_cpu_bound"] is None  # serial-warm is the baseline
    assert "100%" in tp.comparison_table(rows).splitlines()[2]


def test_cluster_cpu_per_step_against_the_floor():
    rows = [{"mode": "serial-warm", "n": 1, "cpu_s_per_step": {"a": 0.1, "b": 0.1}},
            {"mode": "serial-cold", "n": 1, "cpu_s_per_step": {"a": 0.3}},
            {"mode": "concurrent", "n": 8, "cpu_s_per_step": {"a": 0.15}},
            {"mode": "concurrent", "n": 16, "cpu_s_per_step": {"a": 0.15}}]
    for row in rows:
        row.update(floor_cpu_s_per_step=None, cpu_per_step_vs_floor=None)
    floor = [{"n": 1, "cpu_s_per_step": 0.08}, {"n": 8, "cpu_s_per_step": 0.1}]
    tp.add_floor_ratios(rows, floor)
    assert rows[0]["cpu_per_step_vs_floor"] == pytest.approx(0.2 / 0.08)  # serial-warm vs the floor's serial
    assert rows[1]["cpu_per_step_vs_floor"] is None  # serial-cold has no floor
    assert rows[2]["cpu_per_step_vs_floor"] == pytest.approx(1.5) and rows[2]["floor_cpu_s_per_step"] == 0.1
    assert rows[3]["cpu_per_step_vs_floor"] is None  # no floor run for N=16


def test_peer_ratios_with_and_without_its_process_start():
    rows = [tp.summarize_mode(tp.ModeRun("serial-warm", 1, 36.0, [outcome(0.5)], 1.0)),
            tp.summarize_mode(tp.ModeRun("concurrent", 4, 18.0, [outcome(0.5)] * 2, 1.0)),
            tp.summarize_mode(tp.ModeRun("concurrent", 8, 9.0, [outcome(0.6)] * 2, 1.0))]
    peer = {"peer": "trl", "trl_version": "1.0", "experiments_per_hour": 100.0, "experiments_per_hour_warm": 400.0,
            "final_accuracy_mean": 0.4}
    tp.add_peer_ratios(rows, peer)
    assert rows[2]["experiments_per_hour"] == pytest.approx(800.0)
    assert rows[2]["throughput_ratio_vs_peer"] == pytest.approx(8.0)
    assert rows[2]["throughput_ratio_vs_peer_warm"] == pytest.approx(2.0)
    comparison = tp.peer_comparison(rows, peer)
    assert comparison["c_lora_n"] == 8 and comparison["throughput_ratio_vs_peer_warm"] == pytest.approx(2.0)
    assert comparison["c_lora_final_accuracy"] == pytest.approx(0.6) and comparison["peer_final_accuracy"] == 0.4
    assert comparison["c_lora_serial_warm_experiments_per_hour"] == pytest.approx(100.0)
    assert tp.peer_comparison(rows[:2], peer)["c_lora_n"] == 4  # no N=8: the largest N run
    assert tp.peer_comparison(rows, None) is None
    assert "8.00x" in tp.peer_summary_table(peer, comparison)


def test_resident_memory_is_read_from_proc_and_shared_per_tenant():
    import os

    rss, peak = tp.process_memory_mb(os.getpid())
    assert 0 < rss <= peak
    assert tp.process_memory_mb(None) is None and tp.process_memory_mb(2 ** 31 - 1) is None
    run = tp.ModeRun("concurrent", 4, 4.0, [outcome(0.5)], 1.0, rss_mb={"rollout": 400.0, "trainer": 200.0},
                     peak_rss_mb={"rollout": 500.0, "trainer": 250.0})
    row = tp.summarize_mode(run)
    assert row["rss_mb_per_tenant"] == {"rollout": pytest.approx(100.0), "trainer": pytest.approx(50.0)}
    lines = tp.growth_table([row]).splitlines()
    assert "ROLLOUT RSS MB (/TENANT)" in lines[0] and "400 (100)" in lines[1]

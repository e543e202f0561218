"""The Tinker RL-loop benchmark's pure parts: the --clients flag, the shared
decode steps between two heartbeat readings, the per-configuration summary
and its table (no cluster, no I/O)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "load_tests" / "tinker_rl_loop.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("tinker_rl_loop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rl = _load_script()


def test_clients_flag():
    assert rl.parse_clients("1,3") == (1, 3)
    assert rl.parse_clients(" 3, 1,3 ") == (3, 1)
    for bad in ("", "0,1", "1,x", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--clients"):
            rl.parse_clients(bad)
    assert rl.build_parser().parse_args([]).clients == (1, 3)


def test_shared_steps_count_only_pairs_of_the_given_runs_since_the_first_reading():
    before = {"tk-a|tk-b": 5, "exp|tk-a": 7}
    after = {"tk-a|tk-b": 12, "tk-a|tk-c": 3, "exp|tk-a": 9, "tk-b|tk-z": 4, "tk-b|tk-c": 0}
    assert rl.shared_steps_between(before, after, ["tk-a", "tk-b", "tk-c"]) == {"tk-a|tk-b": 7, "tk-a|tk-c": 3}
    assert rl.shared_steps_between(before, after, ["tk-a"]) == {}
    assert rl.shared_steps_between({}, {}, ["tk-a", "tk-b"]) == {}


def test_summary_and_table():
    clients = [rl.ClientResult("tk-a", rewards=[0.25, 0.5, 0.75], step_s=[1.0, 2.0, 3.0]),
               rl.ClientResult("tk-b", rewards=[0.5, 0.5, 1.0], step_s=[2.0, 2.0, 2.0])]
    summary = rl.summarise(clients, wall_s=12.0, decode_steps=40, shared={"tk-a|tk-b": 9})
    assert summary.clients == 2 and summary.steps == 3
    assert summary.steps_per_s == pytest.approx(0.5)
    assert summary.mean_step_s == pytest.approx(2.0)
    assert summary.reward_first == [0.25, 0.5] and summary.reward_last == [0.75, 1.0]
    assert summary.run_ids == ["tk-a", "tk-b"] and summary.decode_steps == 40
    row = rl.format_table([summary]).splitlines()[-1].split()
    assert row[:7] == ["2", "3", "12.0", "0.500", "2.00", "40", "9"]
    assert row[7:] == ["0.25->0.75,", "0.50->1.00"]

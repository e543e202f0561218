"""shared/metrics.py: bounded labels, reason classes, followed counters, and
the metrics settings of the service configs."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from shared import metrics
from shared.config import ConfigError, RolloutConfig, load_config


def test_experiment_labels_stop_at_the_cap_and_then_read_other():
    labels = metrics.ExperimentLabels(cap=2)
    assert [labels.label(e) for e in ("exp-a", "exp-b", "exp-c", "exp-a", "exp-b")] == [
        "exp-a", "exp-b", metrics.OTHER, "exp-a", "exp-b"]
    assert labels.label("exp-d") == metrics.OTHER


def test_experiment_labels_refuse_ids_that_are_no_experiment_ids():
    labels = metrics.ExperimentLabels(cap=100)
    assert labels.label("../../etc/passwd") == metrics.OTHER
    assert labels.label("x" * 10_000) == metrics.OTHER
    assert metrics.ExperimentLabels(cap=0).label("exp-a") == metrics.OTHER


@pytest.mark.parametrize(("reason", "expected"), [
    ("entry is 99999 bytes, over the limit of 10 bytes (max_entry_bytes); not decoded", "too_large"),
    ("entry has no 'msg' field (fields: ['x'])", "malformed"),
    ("entry has fields other than 'msg' (fields: ['a', 'msg'])", "malformed"),
    ("cannot decode message: Expected `object`, got `int`", "undecodable"),
    ("delivered 6 times without an ack (its consumers died or were stopped while handling it)", "max_deliveries"),
    ("failed 5 deliveries; last error: ValueError: boom", "handler_failed"),
    ("permanent error: job over budget", "permanent"),
    ("anything else \n with user text", metrics.OTHER),
])
def test_dead_letter_reasons_reduce_to_a_few_classes(reason, expected):
    assert metrics.reason_class(reason) == expected
    assert expected in metrics.REASON_CLASSES


def test_bounded_keeps_known_values_only():
    assert metrics.bounded("http", ("http", "worker")) == "http"
    assert metrics.bounded("evil{label}", ("http", "worker")) == metrics.OTHER


def test_counter_follower_adds_only_growth():
    counter = Counter("followed", "test", registry=CollectorRegistry())
    follower = metrics.CounterFollower()
    for running_total in (3, 3, 10, 2, 5):  # 2: the source restarted; 5 grows from there
        follower.follow(counter, running_total)
    assert counter._value.get() == 3 + 7 + 3


def test_series_names_are_prefixed_and_cover_counters_and_histograms():
    names = metrics.series_names()
    assert all(name.startswith("clora_") for name in names)
    assert {"clora_dead_letters_total", "clora_stream_lag", "clora_adapter_load_seconds_bucket",
            "clora_train_step_seconds_count"} <= names


def test_metrics_settings_are_read_and_checked():
    config = load_config(RolloutConfig, [], {"CLORA_METRICS_PORT": "9403", "CLORA_METRICS_HOST": "0.0.0.0",
                                             "CLORA_METRICS_MAX_EXPERIMENTS": "5"})
    assert (config.metrics_port, config.metrics_host, config.metrics_max_experiments) == (9403, "0.0.0.0", 5)
    assert load_config(RolloutConfig, [], {}).metrics_port == 0  # a free port by default
    assert load_config(RolloutConfig, ["--metrics-port", "-1"], {}).metrics_port == metrics.METRICS_OFF
    for bad in ("-2", "65536"):
        with pytest.raises(ConfigError, match="CLORA_METRICS_PORT"):
            load_config(RolloutConfig, [], {"CLORA_METRICS_PORT": bad})


def test_a_metrics_server_on_a_free_port_serves_the_series():
    import urllib.request

    server = metrics.MetricsServer("127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        metrics.dead_lettered("unit_test_stream", "cannot decode message: x")
        with urllib.request.urlopen(server.url, timeout=5) as response:
            text = response.read().decode()
        assert 'clora_dead_letters_total{reason="undecodable",stream="unit_test_stream"} 1.0' in text
    finally:
        server.close()

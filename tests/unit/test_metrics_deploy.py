"""The monitoring deployment agrees with the code: the Grafana board queries
only series the services export, Prometheus scrapes the ports compose sets,
the k8s pods are annotated with the port their ConfigMap sets, and compose
with the monitoring profile validates (docker-compose config)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared import metrics

ROOT = Path(__file__).resolve().parents[2]
BOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clora.json"
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERIES = re.compile(r"\bclora_[a-z_]+\b")


def board_exprs() -> list[str]:
    board = json.loads(BOARD.read_text())
    return [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]


def test_the_grafana_board_uses_only_exported_series_and_shows_every_metric():
    exprs = board_exprs()
    used = {name for expr in exprs for name in SERIES.findall(expr)}
    assert used, "the board has no queries"
    assert used <= metrics.series_names(), f"not exported: {sorted(used - metrics.series_names())}"
    families = {metric._name for metric in metrics._ALL}  # noqa: SLF001
    shown = {family for family in families if any(name.startswith(family) for name in used)}
    assert shown == families, f"metrics not on the board: {sorted(families - shown)}"


def test_grafana_provisioning_points_at_the_board_and_prometheus():
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/clora.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_prometheus_scrapes_the_metrics_ports_compose_sets():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    ports = {name: service["environment"]["CLORA_METRICS_PORT"] for name, service in compose["services"].items()
             if "CLORA_METRICS_PORT" in (service.get("environment") or {})}
    assert set(ports) == {"scheduler", "reward", "rollout", "trainer", "rollout-cpu", "trainer-cpu"}
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {target for job in scrape["scrape_configs"] for group in job["static_configs"]
               for target in group["targets"]}
    for name, port in ports.items():
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"
        assert f"127.0.0.1:{port}" in targets, f"prometheus (host network) does not scrape port {port}"


def test_k8s_pods_are_annotated_with_the_configured_metrics_port():
    common = next(doc for doc in yaml.safe_load_all((ROOT / "deploy/k8s/configmap.yaml").read_text())
                  if doc and doc["metadata"]["name"] == "clora-common")
    for name in ("scheduler", "reward", "rollout", "trainer"):
        docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s" / f"{name}.yaml").read_text()) if d]
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == common["data"]["CLORA_METRICS_PORT"]
        assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_with_the_monitoring_profile_is_valid(profile):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose; "
                    "it validates without a Docker engine)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "--profile", profile, "--profile",
                             "monitoring", "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {"prometheus", "grafana"} <= set(services)
    mounts = [str(volume) for volume in services["prometheus"]["volumes"]]
    assert any("deploy/prometheus.yml" in mount for mount in mounts), mounts

"""``clora dashboard`` in a real headless Chromium (Selenium): against a
LocalCluster with ACL roles on (the dashboard connects as the client user),
the page lists the running experiments, their curves gain points while they
run, and the engine's batch composition and the trainer show up. The test
saves a screenshot (``CLORA_DASHBOARD_SCREENSHOT``, default under tmp_path).

Skipped when Chromium, its driver or Selenium are missing (Debian:
``apt-get install chromium chromium-driver``; pip: ``selenium``)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from services.cli.local import LocalCluster
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.messages import ExperimentSpec, RewardSpec, TaskSource
from shared.runtime import heartbeat_key

webdriver = pytest.importorskip("selenium.webdriver", reason="the `selenium` package is not installed")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("CLORA_MODEL_DIR", DEFAULT_MODEL_DIR))
CHROMIUM = os.environ.get("CLORA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CLORA_CHROMEDRIVER") or shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason=f"no model at {MODEL_DIR}"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no Chromium / chromedriver (apt-get install chromium chromium-driver)"),
]
CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json"}
STEPS = 40  # long enough (several seconds) that a page polled each second sees both running
URL_TIMEOUT_S = 60.0
PAGE_TIMEOUT_S = 300.0
STALE_RETRIES = 20  # reads of an element the page redrew meanwhile
IDS = ("dash-sort", "dash-add")


def spec(experiment_id: str, family: str) -> ExperimentSpec:
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(family=family),
                          reward=RewardSpec(type="family", family=family), steps=STEPS, prompts_per_step=8,
                          group_size=4, max_tokens=16, eval_size=8, learning_rate=3e-3)


def start_dashboard(cluster: LocalCluster) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "dashboard", "--port", "0",
                                "--data-dir", str(cluster.data_dir)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + URL_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        line = process.stdout.readline() if ready else ""
        if line.startswith("clora dashboard: http"):
            return process, line.split(": ", 1)[1].strip()
        assert process.poll() is None, f"the dashboard exited: {line}{process.stdout.read()}"
    raise AssertionError("the dashboard printed no URL")


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def fresh(read):
    """``read()``, again while the page's once-a-second redraw replaces the
    elements it found (a stale element is a redraw, not a failure)."""
    for _ in range(STALE_RETRIES):
        try:
            return read()
        except StaleElementReferenceException:
            time.sleep(0.05)
    return read()


def points(driver, experiment_id: str, curve: str) -> int:
    def read() -> int:
        found = driver.find_elements(
            By.CSS_SELECTOR, f'canvas[data-experiment-id="{experiment_id}"][data-curve="{curve}"]')
        return int(found[0].get_attribute("data-points")) if found else 0

    return fresh(read)


def status(driver, experiment_id: str) -> str:
    def read() -> str:
        found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-experiment-id="{experiment_id}"] td[data-status]')
        return found[0].get_attribute("data-status") if found else ""

    return fresh(read)


def page_pairs(driver) -> dict[str, int]:
    def read() -> dict[str, int]:
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.pair")
        return {row.get_attribute("data-pair"): int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows}

    return fresh(read)


def heartbeat_pairs(client: CloraClient) -> dict[str, int]:
    """The rollout worker's ``shared_steps``, read as the client user."""
    raw = client.redis.get(heartbeat_key(client.prefix, "rollout", "rollout-0"))
    return dict(msgspec.msgpack.decode(raw)["status"]["shared_steps"]) if raw else {}


def test_dashboard_lists_experiments_and_its_curves_grow_while_they_run(tmp_path):
    screenshot = Path(os.environ.get("CLORA_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
    cluster = LocalCluster(tmp_path / "cluster", env=CLUSTER_ENV, acl=True)
    dashboard, driver = None, None
    try:
        cluster.start()
        cluster.wait_ready()
        dashboard, url = start_dashboard(cluster)
        driver = browser()
        driver.get(url)
        wait = WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda d: d.find_elements(By.ID, "train-queue"))  # the page rendered one state
        client = CloraClient.connect(cluster.url, cluster.stream_prefix, data_dir=cluster.data_dir)
        for experiment_id, family in zip(IDS, ("sort", "add"), strict=True):
            client.submit(spec(experiment_id, family))

        wait.until(lambda d: all(status(d, i) == "running" for i in IDS))  # listed while running
        wait.until(lambda d: points(d, IDS[0], "reward") >= 1)
        seen = points(driver, IDS[0], "reward")
        assert seen < STEPS and status(driver, IDS[0]) == "running"
        wait.until(lambda d: points(d, IDS[0], "reward") > seen)  # the curve gained a point while it ran
        wait.until(lambda d: all(status(d, i) == "finished" for i in IDS))
        wait.until(lambda d: all(points(d, i, "reward") == STEPS for i in IDS))
        assert all(points(driver, i, "held_out") == 2 for i in IDS)  # version 0 and the last one
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".worker[data-worker]"))  # rollout heartbeat read
        assert driver.find_elements(By.CSS_SELECTOR, ".trainer[data-worker]")
        # The batch composition shown is the rollout heartbeat's: the pairs of
        # tenants that shared decode steps (whether these two did depends on timing).
        wait.until(lambda d: page_pairs(d) == heartbeat_pairs(client))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    finally:
        if driver is not None:
            driver.quit()
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
        cluster.stop()

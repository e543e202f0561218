"""Start and stop ``bus_worker.py`` subprocesses for tests (each test stops
only the processes it started, by their pid)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("bus_worker.py")
POLL_S = 0.05


class WorkerProcesses:
    """The worker subprocesses of one test; ``stop_all`` kills the survivors."""

    def __init__(self, redis_url: str, prefix: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def env(self) -> dict[str, str]:
        return {**os.environ, "REDIS_URL": self.redis_url, "CLORA_STREAM_PREFIX": self.prefix,
                "CLORA_LOG_FORMAT": "json", "CLORA_LOG_LEVEL": "debug"}

    def start(self, *flags: str) -> subprocess.Popen:
        log_file = (self.log_dir / f"worker-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), *flags], cwd=REPO_ROOT, env=self.env(),
            stdout=log_file, stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def wait_for(condition, timeout_s: float, what: str):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

"""Smoke check of `docker compose up` for real: the CPU stack built, started and used.

    sudo .venv/bin/python deploy/smoke_compose.py [--cache-dir /var/cache/clora-docker]

What it does, in order:

1. starts its own Docker engine (Debian's ``dockerd``, as root) on a private
   socket, with no bridge network, no iptables and no masquerading: every
   container of this check runs on the host network and talks over loopback;
2. makes the base image locally when no registry is reachable: a Debian
   bookworm root filesystem (Python 3.11 + venv) from ``debootstrap``,
   imported with ``docker import`` (the host's CA certificates included, so
   pip inside the build trusts what the host trusts);
3. builds ``deploy/Dockerfile.cpu`` from it, with the CPU torch wheel that
   ``pip download torch==2.13.0+cpu`` finds on this host (put into
   ``deploy/wheels/`` for the build, removed afterwards);
4. starts the ``cpu`` profile of docker-compose.yml with the host-network
   override ``deploy/compose.hostnet.yml`` (Redis on a free loopback port),
   under a project name of its own, and waits for every health check;
5. submits an experiment through the published Redis port with
   ``shared.client.CloraClient``, waits for it to finish and checks (digest
   recomputed) that its final adapter is on the ``clora-data`` volume;
6. ``docker-compose down -v``, stops the engine and removes its folders.

It prints the experiment id, its final held-out accuracy, the time from
``up`` to finished, the image size and build time, and one JSON line
(``SMOKE_RESULT {...}``). Exit 0: passed; 1: the stack failed; 77: no Docker
engine can be started here (not root, no dockerd, no docker-compose).

``--cache-dir``: keep the engine's data root (images, build cache) there
between runs, so that a second run on the same machine builds warm. Without
it everything lives in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.hostnet.yml"]
WHEEL_DIR = ROOT / "deploy" / "wheels"
TORCH_VERSION = "2.13.0+cpu"  # the Dockerfile's default; PyPI has no +cpu build, so no CUDA download
LOCAL_BASE_IMAGE = "clora-base:bookworm"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, what the project needs
DEBIAN_MIRROR = "http://deb.debian.org/debian"
IMAGE = "c-lora:cpu"
DEPS_IMAGE = "c-lora:cpu-deps"  # the Dockerfile's dependencies stage, kept as the build cache
SKIP_EXIT = 77  # "cannot run here", as automake's test drivers use it

DAEMON_START_TIMEOUT_S = 90
BUILD_TIMEOUT_S = 1800
HEALTHY_TIMEOUT_S = 300
RECORD_TIMEOUT_S = 60
EXPERIMENT_TIMEOUT_S = 600
DOWN_TIMEOUT_S = 120
DAEMON_STOP_TIMEOUT_S = 30

# A short experiment on the shipped tiny model (the demo's settings, fewer steps).
EXPERIMENT = {
    "task": {"family": "add"},
    "reward": {"type": "family", "family": "add"},
    "steps": 8,
    "prompts_per_step": 8,
    "group_size": 8,
    "max_tokens": 8,
    "learning_rate": 2e-3,
    "lora_rank": 8,
    "eval_size": 64,
}


class CannotRun(Exception):
    """No Docker engine can be started on this machine (a reason, not a failure)."""


class SmokeFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(argv: list, *, env: dict | None = None, timeout: float = 300, check: bool = True,
        capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], env=env, timeout=timeout, text=True,
                            capture_output=capture, **kwargs)
    if check and result.returncode != 0:
        output = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if capture else ""
        raise SmokeFailed(f"{' '.join(map(str, argv[:6]))} ... exited {result.returncode}\n{output}")
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- preflight


APT_PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}


def install_missing_tools() -> None:
    """apt-get install what is missing of dockerd, docker-compose, debootstrap (Debian's packages)."""
    missing = sorted({package for tool, package in APT_PACKAGES.items() if not shutil.which(tool)})
    if not missing or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    log(f"installing {missing} with apt-get")
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        result = run(argv, env=apt_env, timeout=900, check=False)
        if result.returncode != 0:
            raise CannotRun(f"{' '.join(argv[:2])} failed: {result.stderr.strip()[-500:]}")


def docker_tools() -> tuple[str, str, str]:
    """(dockerd, docker client, docker-compose) or CannotRun with the reason."""
    if os.geteuid() != 0:
        raise CannotRun("not root: a Docker engine of its own needs root")
    dockerd = shutil.which("dockerd")
    compose = shutil.which("docker-compose")
    if not dockerd or not compose:
        raise CannotRun("dockerd or docker-compose missing (apt-get install -y docker.io docker-compose debootstrap)")
    # The client packaged with that dockerd (a newer client elsewhere on PATH may
    # speak an API version this engine does not).
    client = Path(dockerd).resolve().parent.parent / "bin" / "docker"
    return dockerd, str(client) if client.is_file() else shutil.which("docker") or "docker", compose


# ---------------------------------------------------------------- the engine


@contextmanager
def docker_engine(dockerd: str, client: str, data_root: Path | None):
    """A dockerd of our own; yields the environment that points clients at it.
    On exit: stopped, its temporary folders removed (the data root too, unless given)."""
    work = Path(tempfile.mkdtemp(prefix="clora-docker-"))
    data_root = data_root or work / "root"
    data_root.mkdir(parents=True, exist_ok=True)
    sock = work / "docker.sock"
    argv = [dockerd, "--host", f"unix://{sock}", "--data-root", data_root, "--exec-root", work / "exec",
            "--pidfile", work / "docker.pid", "--bridge=none", "--iptables=false", "--ip-masq=false"]
    daemon_log = open(work / "dockerd.log", "w")
    daemon = subprocess.Popen([str(a) for a in argv], stdout=daemon_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env["DOCKER_HOST"] = f"unix://{sock}"
    try:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while run([client, "version"], env=env, check=False, timeout=30).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                tail = (work / "dockerd.log").read_text()[-3000:]
                raise CannotRun(f"dockerd did not start (exit {daemon.poll()}):\n{tail}")
            time.sleep(1)
        log(f"dockerd up (pid {daemon.pid}, data root {data_root})")
        yield env
    finally:
        stop_engine(daemon)
        daemon_log.close()
        unmount_under(work)
        if data_root != work / "root":
            unmount_under(data_root)
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():
            log(f"WARNING: could not remove {work} entirely")


def stop_engine(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=DAEMON_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log("dockerd ignored SIGTERM: killing its process group")
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
    # Its own containerd runs in the same session: nothing of it may outlive the check.
    try:
        os.killpg(daemon.pid, 0)
    except ProcessLookupError:
        pass
    else:
        log("processes of the engine's session still alive after dockerd exited: killing them")
        os.killpg(daemon.pid, signal.SIGKILL)
    log(f"dockerd stopped (exit {daemon.returncode})")


def unmount_under(directory: Path) -> None:
    """Unmount what a stopped engine left mounted below ``directory`` (the
    default network namespace's bind mount under its exec root, at least)."""
    prefix = str(directory.resolve()) + "/"
    mount_points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                    if line.split()[4].startswith(prefix)]
    for mount_point in sorted(mount_points, key=len, reverse=True):  # the deepest first
        result = run(["umount", mount_point], check=False, timeout=60)
        if result.returncode != 0:
            log(f"WARNING: could not unmount {mount_point}: {result.stderr.strip()}")


@contextmanager
def locked(directory: Path):
    """One engine per data root at a time (two dockerds on one data root corrupt it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".smoke.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# ---------------------------------------------------------------- images


def image_exists(client: str, env: dict, image: str) -> bool:
    return run([client, "image", "inspect", image], env=env, check=False, timeout=60).returncode == 0


def make_local_base(client: str, env: dict) -> str:
    """Debian bookworm with Python 3.11 + venv, imported as LOCAL_BASE_IMAGE (once per data root)."""
    if image_exists(client, env, LOCAL_BASE_IMAGE):
        log(f"base image {LOCAL_BASE_IMAGE} already in the engine")
        return LOCAL_BASE_IMAGE
    if not shutil.which("debootstrap"):
        raise CannotRun("no base image: debootstrap is missing (apt-get install -y debootstrap)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clora-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             DEBIAN_SUITE, rootfs, DEBIAN_MIRROR], timeout=900)
        # The host's extra CA certificates (a TLS-inspecting proxy's, say): pip in the build trusts them.
        extra_cas = list(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        for cert in extra_cas:
            shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
        if extra_cas:
            run(["chroot", rootfs, "update-ca-certificates"], timeout=120)
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        archive = Path(tmp) / "rootfs.tar"
        run(["tar", "-C", rootfs, "-cf", archive, "."], timeout=600)
        run([client, "import", "--change", "ENV LANG=C.UTF-8",
             "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", archive, LOCAL_BASE_IMAGE],
            env=env, timeout=600)
    log(f"base image {LOCAL_BASE_IMAGE} made with debootstrap in {time.monotonic() - started:.0f} s")
    return LOCAL_BASE_IMAGE


@contextmanager
def staged_torch_wheel():
    """The CPU torch wheel pip finds on this host, in deploy/wheels/ for the build; None when none."""
    with tempfile.TemporaryDirectory(prefix="clora-wheel-") as tmp:
        download = run([sys.executable, "-m", "pip", "download", f"torch=={TORCH_VERSION}", "--no-deps",
                        "--only-binary", ":all:", "-d", tmp], check=False, timeout=900)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if download.returncode != 0 or not wheels:
            log("no local CPU torch wheel: the build uses the Dockerfile's default index")
            yield None
            return
        staged = Path(shutil.move(wheels[0], WHEEL_DIR / wheels[0].name))
        try:
            yield staged
        finally:
            staged.unlink(missing_ok=True)


def build_image(client: str, env: dict, base_image: str, wheel: Path | None) -> float:
    args = ["--build-arg", f"BASE_IMAGE={base_image}"]
    if wheel is not None:
        # torch from the wheel; its dependencies, and the project's, from PyPI.
        args += ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple"]
    started = time.monotonic()
    # The classic builder: the one every dockerd has, and its step-by-step log reads well in CI.
    # The dependencies stage gets a tag of its own: untagged, its layers would be
    # "dangling" and the prune below would throw the build cache away.
    build = [client, "build", "--network", "host", "-f", ROOT / "deploy" / "Dockerfile.cpu", *args]
    for target_args in (["--target", "deps", "-t", DEPS_IMAGE], ["-t", IMAGE]):
        run([*build, *target_args, ROOT], env={**env, "DOCKER_BUILDKIT": "0"}, timeout=BUILD_TIMEOUT_S, capture=False)
    took_s = time.monotonic() - started
    # Earlier builds' images, now untagged, would pile up in a kept cache folder.
    run([client, "image", "prune", "-f"], env=env, timeout=300)
    return took_s


def image_size_mb(client: str, env: dict) -> float:
    size = run([client, "image", "inspect", "-f", "{{.Size}}", IMAGE], env=env, timeout=60).stdout.strip()
    return int(size) / 1e6


# ---------------------------------------------------------------- the stack


class Stack:
    """The cpu profile under one docker-compose project.

    The project runs from one rendered file: docker-compose.yml merged with
    deploy/compose.hostnet.yml (``docker-compose config``), less the ``ports``
    of host-network services. On the host network a service's port already is
    the host's port, and docker-compose 1.x refuses published ports there,
    while an override can only add to the base file's ``ports``, never drop
    them (compose v2 would take the two files as they are)."""

    def __init__(self, compose: str, client: str, env: dict, work_dir: Path) -> None:
        self.client = client
        self.project = f"clora-smoke-{uuid.uuid4().hex[:8]}"
        self.redis_port = free_port()
        self.reward_port = free_port()
        self.secrets_dir = work_dir / f"{self.project}-secrets"
        self.env = {**env, "CLORA_REDIS_HOST_PORT": str(self.redis_port),
                    "CLORA_EXAMPLE_REWARD_PORT": str(self.reward_port), "CLORA_CPU_IMAGE": IMAGE,
                    "CLORA_SECRETS_DIR": str(self.secrets_dir)}
        self.passwords = make_secrets(self.secrets_dir, self.env.get("CLORA_STREAM_PREFIX", "clora:"))
        self.rendered = work_dir / f"{self.project}.compose.yml"
        self.compose_cli = [compose, "-p", self.project, "--project-directory", str(ROOT), "--profile", "cpu"]
        self.compose = [*self.compose_cli, "-f", str(self.rendered)]

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def compose_run(self, *args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.compose, *args], env=self.env, timeout=timeout, check=check, cwd=ROOT)

    def render(self) -> None:
        """Base + host-network override, as one file; every service on the host
        network (no bridge, no private-range address, ever), none publishing ports."""
        import yaml

        files = [arg for path in COMPOSE_FILES for arg in ("-f", str(path))]
        merged = yaml.safe_load(run([*self.compose_cli, *files, "config"], env=self.env, cwd=ROOT).stdout)
        off_host = sorted(name for name, service in merged["services"].items()
                          if service.get("network_mode") != "host")
        if off_host:
            raise SmokeFailed(f"services not on the host network: {off_host} (see deploy/compose.hostnet.yml)")
        for service in merged["services"].values():
            service.pop("ports", None)
        self.rendered.write_text(yaml.safe_dump(merged, sort_keys=False))

    def check_no_project_network(self) -> None:
        names = run([self.client, "network", "ls", "--format", "{{.Name}}"], env=self.env, timeout=60).stdout.split()
        created = [name for name in names if name.startswith(self.project)]
        if created:
            raise SmokeFailed(f"docker-compose created networks {created}: containers must stay on the host network")

    def containers(self) -> dict[str, str]:
        """compose service -> container id."""
        found = {}
        for service in self.compose_run("config", "--services").stdout.split():
            ids = self.compose_run("ps", "-q", service).stdout.split()
            if ids:
                found[service] = ids[0]
        return found

    def wait_healthy(self) -> dict[str, float]:
        """Waits until every service's health check passes; seconds to healthy, per service."""
        started = time.monotonic()
        deadline = started + HEALTHY_TIMEOUT_S
        healthy_after: dict[str, float] = {}
        while True:
            containers = self.containers()
            for service, container in containers.items():
                if service in healthy_after:
                    continue
                state = json.loads(run([self.client, "inspect", "-f", "{{json .State}}", container],
                                       env=self.env, timeout=60).stdout)
                health = (state.get("Health") or {}).get("Status")
                if health is None:
                    raise SmokeFailed(f"service {service} has no health check")
                if state.get("Status") != "running" or state.get("RestartCount", 0):
                    raise SmokeFailed(f"service {service} is {state.get('Status')} (restarts "
                                      f"{state.get('RestartCount', 0)}, exit {state.get('ExitCode')})")
                if health == "healthy":
                    healthy_after[service] = time.monotonic() - started
                    log(f"{service} healthy after {healthy_after[service]:.0f} s")
            if containers and len(healthy_after) == len(containers):
                return healthy_after
            if time.monotonic() > deadline:
                waiting = sorted(set(containers) - set(healthy_after))
                raise SmokeFailed(f"not healthy after {HEALTHY_TIMEOUT_S} s: {waiting}")
            time.sleep(2)

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def dump_logs(self) -> None:
        result = self.compose_run("logs", "--no-color", "--tail", "40", check=False, timeout=120)
        print(result.stdout[-20000:], file=sys.stderr)

    def down(self) -> None:
        self.compose_run("down", "-v", "--remove-orphans", "--timeout", "30", timeout=DOWN_TIMEOUT_S, check=False)
        left = run([self.client, "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"],
                   env=self.env, timeout=60, check=False).stdout.split()
        volumes = [v for v in run([self.client, "volume", "ls", "-q"], env=self.env, timeout=60,
                                  check=False).stdout.split() if v.startswith(self.project)]
        if left or volumes:
            raise SmokeFailed(f"docker-compose down left containers {left} and volumes {volumes}")
        log(f"docker-compose down: project {self.project} removed (containers, volumes)")


def make_secrets(directory: Path, prefix: str) -> dict[str, str]:
    """The stack's ACL file and passwords (what `clora acl --container-readable` writes)."""
    sys.path.insert(0, str(ROOT))
    from services.cli.acl import write_acl_file
    from shared.acl import acl_file_text, ensure_passwords

    passwords = ensure_passwords(directory, file_mode=0o644)
    write_acl_file(directory / "users.acl", acl_file_text(prefix, passwords), 0o644)
    return passwords


def run_experiment(stack: Stack) -> dict:
    """Submit through the published Redis port; wait for the end; the final record as a dict."""
    sys.path.insert(0, str(ROOT))
    from shared.acl import with_credentials
    from shared.client import CloraClient

    experiment_id = f"smoke-{uuid.uuid4().hex[:6]}"
    client_url = with_credentials(stack.redis_url, "client", stack.passwords["client"])
    with CloraClient.connect(client_url, prefix=stack.env.get("CLORA_STREAM_PREFIX", "clora:")) as client:
        client.submit({"experiment_id": experiment_id, **EXPERIMENT})
        log(f"submitted {experiment_id} to {stack.redis_url}")
        # A scheduler that cannot take the submission (it dead-letters it) never
        # records it: say so now rather than after the whole experiment timeout.
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        while client.experiment(experiment_id) is None:
            if time.monotonic() > deadline:
                raise SmokeFailed(f"the scheduler did not record {experiment_id} within {RECORD_TIMEOUT_S} s")
            time.sleep(0.5)
        record = client.wait(experiment_id, timeout_s=EXPERIMENT_TIMEOUT_S)
        if record.status != "finished":
            raise SmokeFailed(f"{experiment_id} ended {record.status}: {record.error}")
        adapter = client.version_path(experiment_id, record.version)
    return {"experiment_id": experiment_id, "record": record, "adapter": str(adapter)}


def check_adapter_on_volume(stack: Stack, adapter: str) -> str:
    """The final adapter, read from the data volume by a fresh container: its digest recomputed."""
    verify = ("import sys; from pathlib import Path; from shared.adapters import AdapterStore; "
              "path = Path(sys.argv[1]); print(AdapterStore(path.parent.parent).verify(path))")
    result = run([stack.client, "run", "--rm", "--network", "none", "-v", f"{stack.volume('clora-data')}:/data",
                  IMAGE, "python", "-c", verify, adapter], env=stack.env, timeout=120)
    return result.stdout.strip()


# ---------------------------------------------------------------- main


def smoke(cache_dir: Path | None) -> dict:
    dockerd, client, compose = docker_tools()
    results: dict = {}
    with ExitStack() as stack_of_cleanups:
        if cache_dir is not None:
            stack_of_cleanups.enter_context(locked(cache_dir))
        env = stack_of_cleanups.enter_context(docker_engine(dockerd, client, cache_dir))
        started = time.monotonic()
        base_image = os.environ.get("CLORA_BASE_IMAGE") or make_local_base(client, env)
        results["base_image_s"] = round(time.monotonic() - started, 1)
        wheel = stack_of_cleanups.enter_context(staged_torch_wheel())
        results["build_s"] = round(build_image(client, env, base_image, wheel), 1)
        results["image_mb"] = round(image_size_mb(client, env), 1)
        log(f"image {IMAGE}: {results['image_mb']:.0f} MB, built in {results['build_s']:.0f} s")

        work_dir = Path(stack_of_cleanups.enter_context(tempfile.TemporaryDirectory(prefix="clora-smoke-")))
        stack = Stack(compose, client, env, work_dir)
        stack.render()
        up_at = time.monotonic()
        try:
            stack.compose_run("up", "-d", "--no-build", timeout=600)
            stack.check_no_project_network()
            results["healthy_s"] = {k: round(v, 1) for k, v in stack.wait_healthy().items()}
            outcome = run_experiment(stack)
            results["up_to_finished_s"] = round(time.monotonic() - up_at, 1)
            record = outcome["record"]
            results.update(experiment_id=outcome["experiment_id"], status=record.status, steps=record.step,
                           start_accuracy=record.start_accuracy, final_accuracy=record.final_accuracy,
                           adapter=outcome["adapter"],
                           adapter_digest=check_adapter_on_volume(stack, outcome["adapter"]))
        except BaseException:
            stack.dump_logs()
            raise
        finally:
            stack.down()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=os.environ.get("CLORA_DOCKER_CACHE") or None,
                        help="keep the engine's data root (images, build cache) here between runs "
                             "(default: $CLORA_DOCKER_CACHE, else a temporary folder)")
    parser.add_argument("--install", action="store_true",
                        help="apt-get install docker.io, docker-compose and debootstrap where missing (as root)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.install:
            install_missing_tools()
        results = smoke(args.cache_dir)
    except CannotRun as reason:
        print(f"SMOKE_SKIP {reason}", flush=True)
        return SKIP_EXIT
    except SmokeFailed as failure:
        print(f"SMOKE_FAILED {failure}", flush=True)
        return 1
    results["total_s"] = round(time.monotonic() - started, 1)
    accuracy = results["final_accuracy"]
    print(f"experiment {results['experiment_id']}: {results['status']} after {results['steps']} steps, "
          f"held-out accuracy {results['start_accuracy']} -> {accuracy}; "
          f"{results['up_to_finished_s']:.0f} s from `up` to finished")
    print(f"image {IMAGE}: {results['image_mb']:.0f} MB, build {results['build_s']:.0f} s "
          f"(+ {results['base_image_s']:.0f} s for the base image); "
          f"whole smoke check {results['total_s']:.0f} s")
    print("SMOKE_RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

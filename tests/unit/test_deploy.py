"""The deployment files agree with the code.

docker-compose.yml and deploy/k8s/*.yaml may only start real ``clora``
subcommands, with flags and environment variables that the service's config
class reads (and values it can parse); healthchecks and probes check the
service their container runs; each stack has every service once; the LoRA
signature, the trainer shard count and the adapter volume are the same
wherever they appear. Compose's own validation runs through ``docker-compose
config`` (Debian's package works without a Docker engine); the Kubernetes
checks parse YAML only, so no kubectl or cluster is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.cli.__main__ import COMMANDS
from services.gateway.config import GatewayConfig
from shared.config import (
    ConfigError,
    ExampleRewardConfig,
    RewardConfig,
    RolloutConfig,
    SchedulerConfig,
    TrainerConfig,
    config_env_names,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
COMPOSE_TIMEOUT_S = 120

# clora subcommand -> the config class that subcommand loads.
SERVICE_CONFIGS = {
    "scheduler": SchedulerConfig,
    "rollout": RolloutConfig,
    "trainer": TrainerConfig,
    "reward": RewardConfig,
    "example-reward": ExampleRewardConfig,
    "gateway": GatewayConfig,
}
OPT_IN_SERVICES = {"gateway"}  # compose: profile "tinker" only; k8s: deploy/k8s/gateway.yaml
HEARTBEAT_SERVICES = ("scheduler", "rollout", "reward", "trainer", "gateway")  # what `clora check` can check
LORA_SERVICES = ("scheduler", "rollout", "trainer")  # must share one LoRA signature

# Variables read by the libraries under the GPU services, not by C-LoRA's config.
MODEL_LIBRARY_ENV = {
    "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES",
}
ENV_EXCEPTIONS = {
    "rollout": MODEL_LIBRARY_ENV | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING"},
    "trainer": MODEL_LIBRARY_ENV,
}

INTERPOLATION = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


# ---------------------------------------------------------------- helpers


def interpolate(value, environ: dict[str, str] | None = None):
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR}`` /
    ``${VAR:?error}`` with ``environ`` (default: empty, i.e. the file's own
    defaults); a required variable that is missing is a ValueError."""
    if not isinstance(value, str):
        return value
    environ = environ or {}

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":  # an escaped dollar sign
            return "$"
        name, op, default = match.group("name"), match.group("op"), match.group("default") or ""
        if name in environ and (environ[name] != "" or op not in (":-", ":?")):
            return environ[name]
        if op and op.endswith("?"):
            raise ValueError(f"${{{name}}} is required: {default}")
        return default if op else ""

    return INTERPOLATION.sub(substitute, value)


def command_argv(command) -> list[str]:
    if command is None:
        return []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def clora_invocation(argv: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its argv) when ``argv`` runs ``clora``, else None."""
    if len(argv) >= 2 and Path(argv[0]).name == "clora":
        return argv[1], argv[2:]
    return None


def check_service_argv(subcommand: str, argv: list[str], environ: dict[str, str], where: str) -> None:
    """The subcommand exists, and its config class accepts these flags and env values."""
    assert subcommand in COMMANDS, f"{where}: `clora {subcommand}` is not a clora command ({sorted(COMMANDS)})"
    assert subcommand in SERVICE_CONFIGS, f"{where}: `clora {subcommand}` is not a long-running service"
    cls = SERVICE_CONFIGS[subcommand]
    try:
        load_config(cls, argv, environ)
    except SystemExit as exc:  # argparse: unknown flag or missing value
        pytest.fail(f"{where}: {cls.__name__} rejects flags {argv} (exit {exc.code})")
    except ConfigError as exc:
        pytest.fail(f"{where}: {cls.__name__} cannot read a value: {exc}")


def check_env_names(subcommand: str, names: set[str], where: str) -> None:
    allowed = config_env_names(SERVICE_CONFIGS[subcommand]) | ENV_EXCEPTIONS.get(subcommand, set())
    unread = sorted(names - allowed)
    assert not unread, (f"{where}: environment variables {unread} are not read by "
                        f"{SERVICE_CONFIGS[subcommand].__name__} (nor documented exceptions)")


def check_healthcheck_argv(argv: list[str], subcommand: str, where: str) -> None:
    invocation = clora_invocation(argv)
    assert invocation is not None, f"{where}: health check {argv} does not use `clora check`"
    name, rest = invocation
    assert name == "check" and name in COMMANDS, f"{where}: health check runs `clora {name}`, not `clora check`"
    assert rest and rest[0] == subcommand, f"{where}: health check checks {rest[:1]}, the container runs {subcommand!r}"


# ---------------------------------------------------------------- compose


def compose_cli() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=COMPOSE_TIMEOUT_S)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def clora_services(compose: dict) -> dict[str, tuple[str, list[str], dict]]:
    """compose service name -> (clora subcommand, its argv, the service)."""
    found = {}
    for name, service in compose["services"].items():
        invocation = clora_invocation(command_argv(service.get("command")))
        if invocation is not None:
            found[name] = (*invocation, service)
    return found


def compose_env(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {name: str(interpolate(value)) for name, value in environment.items()}


def active_services(compose: dict, profile: str) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items()
            if not service.get("profiles") or profile in service["profiles"]}


def reserves_gpu(service: dict) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any("gpu" in (device.get("capabilities") or []) for device in devices)


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_compose_config_is_valid(profile):
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed "
                    "(apt-get install -y docker-compose; it validates without a Docker engine)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    profile_args = ["--profile", profile] if profile else []
    result = subprocess.run([*cli, "-f", str(COMPOSE_FILE), *profile_args, "config", "-q"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S)
    assert result.returncode == 0, f"{' '.join(cli)} config (profile {profile}) failed:\n{result.stderr}"


def test_compose_services_run_real_clora_commands(compose):
    for name, service in compose["services"].items():
        if name == "redis" or "monitoring" in (service.get("profiles") or []):  # Prometheus, Grafana
            continue
        invocation = clora_invocation(command_argv(service.get("command")))
        assert invocation is not None, f"compose service {name!r} does not run a clora command"
        subcommand, argv = invocation
        check_service_argv(subcommand, argv, compose_env(service), f"compose service {name!r}")


def test_compose_env_is_read_by_the_service_config(compose):
    for name, (subcommand, _, service) in clora_services(compose).items():
        check_env_names(subcommand, set(compose_env(service)), f"compose service {name!r}")


def test_compose_healthchecks_check_their_own_service(compose):
    for name, (subcommand, _, service) in clora_services(compose).items():
        test = command_argv((service.get("healthcheck") or {}).get("test"))
        assert test, f"compose service {name!r} has no healthcheck"
        if subcommand in HEARTBEAT_SERVICES:
            assert test[0] == "CMD", f"compose service {name!r}: healthcheck must be an exec form [CMD, ...]"
            check_healthcheck_argv(test[1:], subcommand, f"compose service {name!r}")
    redis_test = command_argv(compose["services"]["redis"]["healthcheck"]["test"])
    assert redis_test[-2:] == ["redis-cli", "ping"]


def test_compose_redis_is_persistent_and_awaited(compose):
    redis_service = compose["services"]["redis"]
    assert "--appendonly" in command_argv(redis_service["command"])
    assert any(str(volume).endswith(":/data") for volume in redis_service["volumes"])
    for name, (subcommand, _, service) in clora_services(compose).items():
        if subcommand in HEARTBEAT_SERVICES:
            condition = (service.get("depends_on") or {}).get("redis", {}).get("condition")
            assert condition == "service_healthy", f"compose service {name!r} must wait for a healthy redis"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_profile_runs_each_service_once(compose, profile):
    active = active_services(compose, profile)
    subcommands = sorted(clora_invocation(command_argv(s.get("command")))[0]
                         for n, s in active.items() if n != "redis")
    assert subcommands == sorted(set(SERVICE_CONFIGS) - OPT_IN_SERVICES), f"profile {profile}: services {subcommands}"
    assert "redis" in active


def test_compose_cpu_profile_needs_no_gpu_and_gpu_profile_uses_vllm(compose):
    cpu = active_services(compose, "cpu")
    assert not [name for name, service in cpu.items() if reserves_gpu(service)], "the cpu profile asks for a GPU"
    by_subcommand = {}
    for service in cpu.values():
        invocation = clora_invocation(command_argv(service.get("command")))
        if invocation:
            by_subcommand[invocation[0]] = compose_env(service)
    assert by_subcommand["rollout"]["CLORA_ENGINE"] == "torch"
    assert by_subcommand["rollout"].get("CLORA_DEVICE", "cpu") == "cpu"
    assert "CLORA_MODEL_DIR" not in by_subcommand["rollout"], "cpu profile: the shipped tiny model is the default"

    gpu = active_services(compose, "gpu")
    gpu_services = {clora_invocation(command_argv(s["command"]))[0]: s for n, s in gpu.items() if reserves_gpu(s)}
    assert sorted(gpu_services) == ["rollout", "trainer"]
    assert compose_env(gpu_services["rollout"])["CLORA_ENGINE"] == "vllm"
    assert compose_env(gpu_services["trainer"])["CLORA_DEVICE"] == "cuda"
    rollout_model = compose_env(gpu_services["rollout"])["CLORA_MODEL_DIR"]
    assert rollout_model and rollout_model == compose_env(gpu_services["trainer"])["CLORA_MODEL_DIR"]
    # No profile-less service may reserve a GPU, or `--profile cpu` would ask for one.
    assert not [n for n, s in compose["services"].items() if not s.get("profiles") and reserves_gpu(s)]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_stack_agrees_on_signature_shards_and_adapter_volume(compose, profile):
    services = {}
    for service in active_services(compose, profile).values():
        invocation = clora_invocation(command_argv(service.get("command")))
        if invocation:
            services[invocation[0]] = service
    envs = {sub: compose_env(service) for sub, service in services.items()}
    signatures = {sub: load_config(SERVICE_CONFIGS[sub], [], envs[sub]).signature for sub in LORA_SERVICES}
    assert len(set(signatures.values())) == 1, f"profile {profile}: LoRA signatures differ: {signatures}"

    scheduler = load_config(SchedulerConfig, [], envs["scheduler"])
    trainer = load_config(TrainerConfig, [], envs["trainer"])
    assert scheduler.num_trainer_shards == trainer.num_shards == 1  # one trainer service per stack
    assert trainer.shard == 0

    # The scheduler verifies every announced version in the adapter store: it needs the volume too.
    mounts = {}
    for sub in ("rollout", "trainer", "scheduler"):
        data_dir = envs[sub].get("CLORA_DATA_DIR")
        sources = [str(v).split(":")[0] for v in services[sub].get("volumes", [])
                   if str(v).split(":")[1] == data_dir]
        assert sources, f"profile {profile}: {sub} has no volume at CLORA_DATA_DIR={data_dir}"
        mounts[sub] = (sources[0], data_dir)
    assert len(set(mounts.values())) == 1, f"profile {profile}: adapters not shared: {mounts}"
    assert mounts["rollout"][0] in (compose.get("volumes") or {}), "the adapter volume must be a named volume"


def test_compose_images_build_from_existing_dockerfiles(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"compose service {name!r}: {dockerfile} does not exist"
    gpu_base = re.search(r"^ARG VLLM_VERSION=(\S+)", (ROOT / "deploy/Dockerfile.gpu").read_text(), re.M)
    assert gpu_base and re.fullmatch(r"v\d+\.\d+\.\d+", gpu_base.group(1)), "pin vllm/vllm-openai to a release tag"
    assert "vllm/vllm-openai:${VLLM_VERSION}" in (ROOT / "deploy/Dockerfile.gpu").read_text()


# ---------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_config_maps(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data") or {} for doc in docs if doc.get("kind") == "ConfigMap"}


def k8s_containers(docs: list[dict]):
    """(workload doc, container) for every container of every workload."""
    for doc in docs:
        if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def k8s_env(container: dict, config_maps: dict[str, dict[str, str]], where: str) -> tuple[set[str], dict[str, str]]:
    """(every variable name the container gets, the values resolvable from the manifests)."""
    names, values = set(), {}
    for source in container.get("envFrom") or []:
        assert "configMapRef" in source, f"{where}: envFrom {source} (only ConfigMaps: their keys can be checked)"
        ref = source["configMapRef"]["name"]
        assert ref in config_maps, f"{where}: ConfigMap {ref!r} is not in deploy/k8s"
        names |= set(config_maps[ref])
        values.update(config_maps[ref])
    for entry in container.get("env") or []:
        names.add(entry["name"])
        if "value" in entry:
            values[entry["name"]] = str(entry["value"])
            continue
        value_from = entry["valueFrom"]
        if "configMapKeyRef" in value_from:
            ref = value_from["configMapKeyRef"]
            assert ref["key"] in config_maps.get(ref["name"], {}), f"{where}: {ref} does not exist"
            values[entry["name"]] = config_maps[ref["name"]][ref["key"]]
        elif "fieldRef" in value_from and "pod-index" in value_from["fieldRef"]["fieldPath"]:
            values[entry["name"]] = "0"  # a StatefulSet pod's ordinal
    return names, values


def k8s_subcommand(container: dict) -> tuple[str, list[str]] | None:
    return clora_invocation(command_argv(container.get("command")) + command_argv(container.get("args")))


def test_k8s_containers_run_real_clora_commands(k8s_docs):
    config_maps = k8s_config_maps(k8s_docs)
    seen = set()
    for doc, container in k8s_containers(k8s_docs):
        where = f"{doc['kind']} {doc['metadata']['name']}/{container['name']}"
        invocation = k8s_subcommand(container)
        assert invocation is not None, f"{where} does not run a clora command"
        subcommand, argv = invocation
        _, values = k8s_env(container, config_maps, where)
        check_service_argv(subcommand, argv, values, where)
        seen.add(subcommand)
    expected = set(SERVICE_CONFIGS)  # the opt-in gateway too (gateway.yaml)
    assert seen == expected, f"deploy/k8s runs {sorted(seen)}, expected {sorted(expected)}"


def test_k8s_env_is_read_by_the_service_config(k8s_docs):
    config_maps = k8s_config_maps(k8s_docs)
    for doc, container in k8s_containers(k8s_docs):
        where = f"{doc['kind']} {doc['metadata']['name']}/{container['name']}"
        subcommand, _ = k8s_subcommand(container)
        names, _ = k8s_env(container, config_maps, where)
        check_env_names(subcommand, names, where)
        if subcommand in HEARTBEAT_SERVICES:
            redis_url = [e for e in container.get("env") or [] if e["name"] == "REDIS_URL"]
            assert redis_url and "secretKeyRef" in redis_url[0]["valueFrom"], f"{where}: REDIS_URL from a Secret"


def test_k8s_probes_check_their_own_service(k8s_docs):
    for doc, container in k8s_containers(k8s_docs):
        where = f"{doc['kind']} {doc['metadata']['name']}/{container['name']}"
        subcommand, _ = k8s_subcommand(container)
        probes = {kind: container.get(kind) for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert probes["readinessProbe"] and probes["livenessProbe"], f"{where}: needs readiness and liveness probes"
        for kind, probe in probes.items():
            if probe and subcommand in HEARTBEAT_SERVICES:
                assert "exec" in probe, f"{where}: {kind} must run `clora check`"
                check_healthcheck_argv(command_argv(probe["exec"]["command"]), subcommand, f"{where} {kind}")


def test_k8s_gpu_workloads_and_scale_out(k8s_docs):
    config_maps = k8s_config_maps(k8s_docs)
    workloads = {k8s_subcommand(c)[0]: (doc, c) for doc, c in k8s_containers(k8s_docs)}
    for subcommand in ("rollout", "trainer"):
        doc, container = workloads[subcommand]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert doc["spec"]["template"]["spec"].get("nodeSelector"), f"{subcommand}: GPU nodes need a nodeSelector"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        _, values = k8s_env(container, config_maps, subcommand)
        volume = mounts[values["CLORA_DATA_DIR"]]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in doc["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims[volume] == "clora-adapters", f"{subcommand}: adapters must be on the shared claim"
    pvc = next(d for d in k8s_docs
               if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == "clora-adapters")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]

    rollout_doc, _ = workloads["rollout"]
    assert rollout_doc["kind"] == "Deployment" and rollout_doc["spec"]["replicas"] >= 2
    assert workloads["scheduler"][0]["spec"]["replicas"] == 1

    trainer_doc, trainer = workloads["trainer"]
    assert trainer_doc["kind"] == "StatefulSet"
    _, trainer_values = k8s_env(trainer, config_maps, "trainer")
    _, scheduler_values = k8s_env(workloads["scheduler"][1], config_maps, "scheduler")
    shards = trainer_doc["spec"]["replicas"]
    assert int(trainer_values["CLORA_NUM_SHARDS"]) == shards == int(scheduler_values["CLORA_NUM_TRAINER_SHARDS"]), (
        f"trainer StatefulSet replicas {shards}, trainer CLORA_NUM_SHARDS {trainer_values['CLORA_NUM_SHARDS']}, "
        f"scheduler CLORA_NUM_TRAINER_SHARDS {scheduler_values['CLORA_NUM_TRAINER_SHARDS']} must agree")
    shard_env = next(e for e in trainer["env"] if e["name"] == "CLORA_SHARD")
    assert shard_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"

    signatures = {}
    for subcommand in LORA_SERVICES:
        _, values = k8s_env(workloads[subcommand][1], config_maps, subcommand)
        signatures[subcommand] = load_config(SERVICE_CONFIGS[subcommand], [], values).signature
    assert len(set(signatures.values())) == 1, f"LoRA signatures differ: {signatures}"


def test_k8s_redis_is_external_and_kustomization_lists_every_manifest(k8s_docs):
    redis_service = next(d for d in k8s_docs if d.get("kind") == "Service" and d["metadata"]["name"] == "clora-redis")
    assert redis_service["spec"]["type"] == "ExternalName"
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


# ---------------------------------------------------------------- host-network override and images

HOSTNET_FILE = ROOT / "deploy" / "compose.hostnet.yml"
HOSTNET_PORTS = {"CLORA_REDIS_HOST_PORT": "23456", "CLORA_EXAMPLE_REWARD_PORT": "23457"}


@pytest.fixture(scope="module")
def hostnet() -> dict:
    return yaml.safe_load(HOSTNET_FILE.read_text())


def test_hostnet_override_puts_every_service_on_loopback(compose, hostnet):
    assert set(hostnet["services"]) == set(compose["services"]), "the override must cover every service"
    for name, service in hostnet["services"].items():
        assert service.get("network_mode") == "host", f"override: {name!r} is not on the host network"
        assert "networks" not in service and "ports" not in service, f"override: {name!r} adds networks or ports"
    for name, (subcommand, _, _) in clora_services(compose).items():
        if subcommand not in HEARTBEAT_SERVICES:
            continue
        env = {k: str(interpolate(v, HOSTNET_PORTS)) for k, v in hostnet["services"][name]["environment"].items()}
        assert env["REDIS_URL"] == "redis://127.0.0.1:23456/0", f"override: {name!r} REDIS_URL {env['REDIS_URL']}"


def test_hostnet_override_runs_redis_from_the_project_image_on_the_chosen_port(compose, hostnet):
    redis_service = hostnet["services"]["redis"]
    assert interpolate(redis_service["image"]) == interpolate(compose["services"]["scheduler"]["image"])
    argv = [interpolate(part, HOSTNET_PORTS) for part in command_argv(redis_service["command"])]
    assert argv[0] == "valkey-server"
    assert argv[argv.index("--bind") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "23456"
    assert argv[argv.index("--appendonly") + 1] == "yes" and argv[argv.index("--dir") + 1] == "/data"
    assert "valkey-server" in (ROOT / "deploy" / "Dockerfile.cpu").read_text(), "the image must ship valkey-server"

    reward_command = command_argv(hostnet["services"]["example-reward"]["command"])
    reward_argv = [interpolate(part, HOSTNET_PORTS) for part in reward_command]
    invocation = clora_invocation(reward_argv)
    check_service_argv(*invocation, {}, "override example-reward")
    assert reward_argv[reward_argv.index("--host") + 1] == "127.0.0.1"
    allowlist = interpolate(hostnet["services"]["reward"]["environment"]["CLORA_HTTP_ALLOWLIST"], HOSTNET_PORTS)
    assert allowlist == f"http://127.0.0.1:{reward_argv[reward_argv.index('--port') + 1]}/"


def test_hostnet_override_merges_and_demands_its_ports():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "CLORA_"))}
    files = ["-f", str(COMPOSE_FILE), "-f", str(HOSTNET_FILE), "--profile", "cpu"]
    merged = subprocess.run([*cli, *files, "config"], cwd=ROOT, env={**env, **HOSTNET_PORTS},
                            capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S)
    assert merged.returncode == 0, merged.stderr
    services = yaml.safe_load(merged.stdout)["services"]
    assert {name: s.get("network_mode") for name, s in services.items()} == dict.fromkeys(services, "host")
    assert services["scheduler"]["environment"]["REDIS_URL"] == "redis://127.0.0.1:23456/0"
    unset = subprocess.run([*cli, *files, "config", "-q"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S)
    assert unset.returncode != 0 and "CLORA_REDIS_HOST_PORT" in unset.stderr


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), re.M))


def test_cpu_dockerfile_takes_base_and_torch_source_as_build_args():
    dockerfile = ROOT / "deploy" / "Dockerfile.cpu"
    args = dockerfile_args(dockerfile)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"].endswith("+cpu"), "pin the CPU build: PyPI's plain torch is the CUDA one"
    text = dockerfile.read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS deps$", text, re.M), "the dependencies stage"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), "the final stage"
    # The wheel folder is part of the build context and exists in the checkout.
    assert "COPY deploy/wheels/ " in text and (ROOT / "deploy" / "wheels").is_dir()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert not [p for p in ignored if p.startswith("deploy/wheels") or p in ("deploy", "deploy/", "deploy/*")]


def test_gpu_dockerfile_takes_its_base_as_a_build_arg():
    dockerfile = ROOT / "deploy" / "Dockerfile.gpu"
    args = dockerfile_args(dockerfile)
    assert args["BASE_IMAGE"] == "vllm/vllm-openai:${VLLM_VERSION}"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile.read_text(), re.M)


# ---------------------------------------------------------------- Redis ACL users and secrets

DEPLOY_FILES = (COMPOSE_FILE, HOSTNET_FILE, *sorted(K8S_DIR.glob("*.yaml")))
URL_WITH_USERINFO = re.compile(r"rediss?://[^/\s@]*:[^/\s@]*@")


def test_no_deployment_file_carries_a_literal_password():
    for path in DEPLOY_FILES:
        text = path.read_text()
        where = path.relative_to(ROOT)
        assert not URL_WITH_USERINFO.search(text), f"{where}: a Redis URL with a password"
        assert "requirepass" not in text and "CLORA_REDIS_PASSWORD:" not in text, f"{where}: a literal password"
        for doc in yaml.safe_load_all(text):
            assert not (doc and doc.get("kind") == "Secret"), f"{where}: Secrets are created outside the repository"


def test_compose_services_connect_as_the_service_user_with_a_secret_file(compose):
    for name, (subcommand, _, service) in clora_services(compose).items():
        if subcommand not in HEARTBEAT_SERVICES:
            continue
        env = compose_env(service)
        assert env["CLORA_REDIS_USERNAME"] == "service", name
        secret = env["CLORA_REDIS_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in compose["secrets"], name
        assert "file" in compose["secrets"][secret], name


def test_compose_redis_loads_its_acl_from_a_secret_and_is_not_published(compose, hostnet):
    redis_service = compose["services"]["redis"]
    command = command_argv(redis_service["command"])
    acl_file = command[command.index("--aclfile") + 1]
    assert acl_file.removeprefix("/run/secrets/") in redis_service["secrets"]
    assert "ports" not in redis_service, "Redis must not be published beyond the stack"
    hostnet_command = command_argv(hostnet["services"]["redis"]["command"])
    assert hostnet_command[hostnet_command.index("--aclfile") + 1] == acl_file


def test_compose_config_renders_the_acl_secrets():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env["CLORA_SECRETS_DIR"] = "/srv/clora-secrets"
    result = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "--profile", "cpu", "config"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=COMPOSE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert rendered["secrets"]["redis-acl"]["file"] == "/srv/clora-secrets/users.acl"
    assert rendered["secrets"]["redis-service-password"]["file"] == "/srv/clora-secrets/service"
    assert rendered["services"]["scheduler"]["environment"]["CLORA_REDIS_USERNAME"] == "service"


def test_k8s_services_connect_as_the_service_user_with_a_mounted_secret(k8s_docs):
    config_maps = k8s_config_maps(k8s_docs)
    for doc, container in k8s_containers(k8s_docs):
        subcommand, _ = k8s_subcommand(container)
        if subcommand not in HEARTBEAT_SERVICES:
            continue
        where = f"{doc['metadata']['name']}/{container['name']}"
        _, values = k8s_env(container, config_maps, where)
        assert values["CLORA_REDIS_USERNAME"] == "service", where
        password_file = Path(values["CLORA_REDIS_PASSWORD_FILE"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mounts[str(password_file.parent)]]["secret"]
        assert secret["secretName"] == "clora-redis", where
        assert [item["path"] for item in secret["items"]] == [password_file.name] == ["service-password"], where


def test_k8s_gateway_is_one_replica_served_with_keys_from_a_secret(k8s_docs):
    config_maps = k8s_config_maps(k8s_docs)
    doc, container = next((d, c) for d, c in k8s_containers(k8s_docs) if k8s_subcommand(c)[0] == "gateway")
    assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"]["type"] == "Recreate"  # one consumer group
    _, values = k8s_env(container, config_maps, "gateway")
    assert "CLORA_GATEWAY_API_KEYS" not in values, "API keys come from the mounted Secret, not the environment"
    keys_file = Path(values["CLORA_GATEWAY_API_KEYS_FILE"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[str(keys_file.parent)]]["secret"]
    assert secret["secretName"] == "clora-gateway-keys" and [i["path"] for i in secret["items"]] == [keys_file.name]
    assert values["CLORA_GATEWAY_HOST"] == "0.0.0.0"
    port = int(values["CLORA_GATEWAY_PORT"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
    service = next(d for d in k8s_docs if d.get("kind") == "Service" and d["metadata"]["name"] == "clora-gateway")
    assert service["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "http")]
    annotations = doc["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == values["CLORA_METRICS_PORT"]

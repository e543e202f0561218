"""A Tinker-SDK RL loop against the gateway of one LocalCluster: one client,
then C clients at once (issue 21).

One ``LocalCluster`` (embedded Redis, the four services, the Tinker gateway,
the shipped tiny model, the environment of tests/integration/
test_tinker_gateway.py) stays up for every configuration. Each client is a
thread with its own ``tinker.ServiceClient`` (its own API key) and its own
LoRA training run, and runs the loop the Tinker docs describe: a new
sampler from the current weights (``save_weights_and_get_sampling_client``),
P prompts of a task family x G samples each, scored with the family's
reward, ``forward_backward`` with ``importance_sampling`` and group-centred
advantages, ``optim_step``; S steps. Before the counted configurations one
uncounted 1-step client warms the cluster (``--no-warmup`` skips it).

Per configuration (number of clients): wall time (all threads started ->
the last one done), steps per second over all clients, mean time per step
(one client's step, averaged over every client's steps), each client's mean
reward at its first and last step, the rollout's decode steps during the
configuration (heartbeat ``decode_steps``), and the decode steps it ran with
rows of two of this configuration's runs in one batch (heartbeat
``shared_steps``, counted up from before the configuration; "shared" in the
table sums the pairs ``"a|b"``, the JSON lists each).

    PYTHONPATH=$PWD python load_tests/tinker_rl_loop.py --json /tmp/tinker_rl.json
    PYTHONPATH=$PWD python load_tests/tinker_rl_loop.py --steps 3 --clients 1,2 --family add
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

BASE_MODEL = "clora-tiny"
FAMILIES = ("sort", "add")
DEFAULT_FAMILY = "sort"
DEFAULT_STEPS = 10
DEFAULT_CLIENTS = (1, 3)
DEFAULT_PROMPTS = 8
DEFAULT_GROUP = 8
LEARNING_RATE = 3e-3  # as tests/integration/test_tinker_gateway.py
LORA_RANK = 8
MAX_TOKENS = 8
HEARTBEAT_WAIT_S = 30.0
CLIENT_TIMEOUT_S = 3600.0


@dataclass
class ClientResult:
    run_id: str
    rewards: list[float]  # mean reward of each step's samples
    step_s: list[float]  # wall time of each step


@dataclass
class ConfigResult:
    clients: int
    steps: int
    wall_s: float
    steps_per_s: float  # every client's steps / wall time
    mean_step_s: float
    reward_first: list[float]  # per client
    reward_last: list[float]
    decode_steps: int  # decode steps the rollout ran during the configuration (any rows)
    shared_steps: dict[str, int]  # "a|b" -> decode steps holding rows of both runs
    run_ids: list[str]


# ---------------------------------------------------------------- pure helpers


def parse_clients(text: str) -> tuple[int, ...]:
    """``"1,3"`` -> (1, 3): integers >= 1, in the given order, duplicates dropped."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients: {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--clients: {text!r} needs integers >= 1")
    return tuple(dict.fromkeys(values))


def shared_steps_between(before: Mapping[str, int], after: Mapping[str, int], run_ids: Sequence[str]) -> dict[str, int]:
    """Decode steps added between two ``shared_steps`` readings for each pair
    ``"a|b"`` whose two tenants are both in ``run_ids`` (pairs with none, left out)."""
    runs = set(run_ids)
    shared = {}
    for pair, steps in after.items():
        first, _, second = pair.partition("|")
        added = int(steps) - int(before.get(pair, 0))
        if first in runs and second in runs and added > 0:
            shared[pair] = added
    return shared


def summarise(clients: Sequence[ClientResult], wall_s: float, decode_steps: int,
              shared: dict[str, int]) -> ConfigResult:
    steps = [len(c.step_s) for c in clients]
    every_step = [s for c in clients for s in c.step_s]
    return ConfigResult(clients=len(clients), steps=max(steps, default=0), wall_s=wall_s,
                        steps_per_s=sum(steps) / wall_s if wall_s > 0 else 0.0,
                        mean_step_s=statistics.fmean(every_step) if every_step else 0.0,
                        reward_first=[c.rewards[0] for c in clients if c.rewards],
                        reward_last=[c.rewards[-1] for c in clients if c.rewards],
                        decode_steps=decode_steps, shared_steps=shared, run_ids=[c.run_id for c in clients])


def format_table(results: Sequence[ConfigResult]) -> str:
    header = (f"{'clients':>7} {'steps':>5} {'wall s':>8} {'steps/s':>8} {'s/step':>7} "
              f"{'decode steps':>12} {'shared':>6}  reward first -> last (per client)")
    lines = [header, "-" * len(header)]
    for r in results:
        rewards = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(r.reward_first, r.reward_last, strict=True))
        lines.append(f"{r.clients:>7} {r.steps:>5} {r.wall_s:>8.1f} {r.steps_per_s:>8.3f} {r.mean_step_s:>7.2f} "
                     f"{r.decode_steps:>12} {sum(r.shared_steps.values()):>6}  {rewards}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the loop


def sampled_step_data(sampler, tokenizer, reward, prompts, group_size: int, params) -> tuple[list, list[float]]:
    """One RL step the Tinker-docs way: ``group_size`` samples of each prompt,
    scored with ``reward``; (importance_sampling datums with group-centred
    advantages, every sample's reward). A group whose samples all scored the
    same gives no datum."""
    import numpy as np
    from tinker import types

    from services.reward.scoring import score_builtin

    encoded = [tokenizer.encode(p.text, add_special_tokens=False) for p in prompts]
    futures = [sampler.sample(types.ModelInput.from_ints(tokens), group_size, params) for tokens in encoded]
    data, rewards = [], []
    for prompt, tokens, future in zip(prompts, encoded, futures, strict=True):
        sequences = future.result().sequences
        scores = [score_builtin(reward, tokenizer.decode(s.tokens, skip_special_tokens=True),
                                prompt.answer).reward for s in sequences]
        rewards += scores
        mean = sum(scores) / len(scores)
        for sequence, score in zip(sequences, scores, strict=True):
            if score == mean or not sequence.tokens:
                continue  # no signal
            full = tokens + list(sequence.tokens)
            pad = [0.0] * (len(tokens) - 1)
            data.append(types.Datum(
                model_input=types.ModelInput.from_ints(full[:-1]),
                loss_fn_inputs={"target_tokens": np.array(full[1:]),
                                "logprobs": np.array(pad + list(sequence.logprobs), dtype=np.float32),
                                "advantages": np.array(pad + [score - mean] * len(sequence.tokens),
                                                       dtype=np.float32)}))
    return data, rewards


def rl_loop(base_url: str, key: str, tokenizer, family_name: str, steps: int, seed: int,
            prompts_per_step: int, group_size: int) -> ClientResult:
    """The Tinker-docs RL loop (as in the integration test), timed per step."""
    import tinker
    from tinker import types

    from shared.messages import RewardSpec
    from shared.tasks import get_family

    family = get_family(family_name)
    reward = RewardSpec(type="family", family=family_name)
    service = tinker.ServiceClient(base_url=base_url, api_key=key)
    training = service.create_lora_training_client(base_model=BASE_MODEL, rank=LORA_RANK).result()
    run_id = training.get_info().model_id
    params = types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, stop=[tokenizer.eos_token_id])
    result = ClientResult(run_id=run_id, rewards=[], step_s=[])
    for step in range(steps):
        started = time.monotonic()
        sampler = training.save_weights_and_get_sampling_client().result()
        prompts = family.generate(seed * 1000 + step, prompts_per_step, "train")
        data, step_rewards = sampled_step_data(sampler, tokenizer, reward, prompts, group_size, params)
        result.rewards.append(sum(step_rewards) / len(step_rewards))
        if data:
            training.forward_backward(data, "importance_sampling")
            training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result()
        result.step_s.append(time.monotonic() - started)
    return result


# ---------------------------------------------------------------- the cluster


def client_keys(count: int) -> list[str]:
    return [f"tml-bench-rl-key-{i}" for i in range(count)]


def cluster_env(keys: Sequence[str]) -> dict[str, str]:
    from shared.config import DEFAULT_MODEL_DIR

    return {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3",
            "CLORA_GATEWAY_API_KEYS": ",".join(keys), "CLORA_BASE_MODEL": BASE_MODEL,
            "CLORA_TOKENIZER_ID": str(DEFAULT_MODEL_DIR)}


def heartbeat_status(cluster, service: str, worker: str, after_ts: float = 0.0) -> dict:
    """``status`` of a service's heartbeat taken after ``after_ts``."""
    import msgspec

    from shared.runtime import heartbeat_key

    client = cluster.redis_client("admin")
    try:
        deadline = time.monotonic() + HEARTBEAT_WAIT_S
        while True:
            raw = client.get(heartbeat_key(cluster.stream_prefix, service, worker))
            if raw is not None:
                beat = msgspec.msgpack.decode(raw)
                if beat["ts"] > after_ts:
                    return beat["status"]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no fresh {service} heartbeat in {HEARTBEAT_WAIT_S:.0f} s")
            time.sleep(0.2)
    finally:
        client.close()


def rollout_status(cluster) -> dict:
    """The rollout's engine counters, from a heartbeat taken from now on."""
    return heartbeat_status(cluster, "rollout", "rollout-0", after_ts=time.time())


def run_config(cluster, base_url: str, tokenizer, args, clients: int) -> ConfigResult:
    before = rollout_status(cluster)
    keys = client_keys(clients)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        loops = [pool.submit(rl_loop, base_url, key, tokenizer, args.family, args.steps, seed=100 * clients + i,
                             prompts_per_step=args.prompts, group_size=args.group) for i, key in enumerate(keys)]
        results = [loop.result(timeout=CLIENT_TIMEOUT_S) for loop in loops]
    wall_s = time.monotonic() - started
    cluster.check_alive()
    after = rollout_status(cluster)
    shared = shared_steps_between(before["shared_steps"], after["shared_steps"], [r.run_id for r in results])
    return summarise(results, wall_s, after["decode_steps"] - before["decode_steps"], shared)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"S per client (default {DEFAULT_STEPS})")
    parser.add_argument("--clients", type=parse_clients, default=DEFAULT_CLIENTS, help="configurations (default 1,3)")
    parser.add_argument("--family", choices=FAMILIES, default=DEFAULT_FAMILY)
    parser.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, help="P prompts per step")
    parser.add_argument("--group", type=int, default=DEFAULT_GROUP, help="G samples per prompt")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the uncounted 1-step client")
    parser.add_argument("--json", dest="json_path", default=None, help="write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or args.group < 1:
        raise SystemExit("--steps, --prompts and --group must be >= 1")
    from transformers import AutoTokenizer

    from services.cli.local import LocalCluster
    from shared.config import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    with tempfile.TemporaryDirectory(prefix="tinker-rl-") as data_dir:
        cluster = LocalCluster(Path(data_dir), env=cluster_env(client_keys(max(args.clients))), gateway_port=0)
        cluster.start()
        try:
            cluster.wait_ready()
            status = heartbeat_status(cluster, "gateway", "gateway")
            base_url = f"http://127.0.0.1:{status['port']}"
            if args.warmup:
                rl_loop(base_url, client_keys(1)[0], tokenizer, args.family, 1, seed=0,
                        prompts_per_step=args.prompts, group_size=args.group)
            results = []
            for clients in args.clients:
                results.append(run_config(cluster, base_url, tokenizer, args, clients))
                print(format_table(results[-1:]), flush=True)
        finally:
            cluster.stop()
    print()
    print(f"Tinker RL loop, family {args.family}, {args.steps} steps of {args.prompts} prompts x {args.group} samples")
    print(format_table(results))
    if args.json_path:
        report = {"family": args.family, "steps": args.steps, "prompts_per_step": args.prompts,
                  "group_size": args.group, "learning_rate": LEARNING_RATE, "warmup": args.warmup,
                  "configs": [asdict(r) for r in results]}
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

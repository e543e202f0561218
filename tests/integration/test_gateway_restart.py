"""A killed Tinker gateway loses nothing a client saved: the official SDK
trains on a LocalCluster, the gateway process gets SIGKILL and starts again
on the same port, and the same ServiceClient / TrainingClient /
SamplingClient objects (and a new ServiceClient with the same key and a saved
path) go on. Another key still sees nothing.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from services.cli.local import LocalCluster
from shared.config import DEFAULT_MODEL_DIR

KEY_A = "tml-restart-test-key-alpha"
KEY_B = "tml-restart-test-key-bravo"
BASE_MODEL = "clora-tiny"
TEXTS = [f"{a}+{b}=77" for a, b in ((3, 4), (10, 20), (31, 5), (8, 8))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the gateway did not come back"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, port):
    env = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3",
           "CLORA_GATEWAY_API_KEYS": f"{KEY_A},{KEY_B}", "CLORA_BASE_MODEL": BASE_MODEL,
           "CLORA_TOKENIZER_ID": str(DEFAULT_MODEL_DIR)}
    # ACL on, as `clora up` runs it: the gateway writes its tables as the `service` user
    cluster = LocalCluster(tmp_path_factory.mktemp("gateway-restart"), env=env, gateway_port=port, acl=True)
    cluster.start()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def supervised_data(tokenizer) -> list[types.Datum]:
    data = []
    for text in TEXTS:
        prompt, answer = text.split("=")
        prompt_tokens = tokenizer.encode(prompt + "=", add_special_tokens=False)
        tokens = prompt_tokens + tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        weights = [0.0] * (len(prompt_tokens) - 1) + [1.0] * (len(tokens) - len(prompt_tokens))
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights}))
    return data


def train(training: tinker.TrainingClient, data: list[types.Datum], steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        fwd_bwd = training.forward_backward(data, "cross_entropy")
        step = training.optim_step(types.AdamParams(learning_rate=1e-2))  # 2e-2 oscillates
        losses.append(fwd_bwd.result().metrics["loss:sum"])
        step.result()
    return losses


def greedy(sampler: tinker.SamplingClient, tokenizer, text: str) -> str:
    prompt = types.ModelInput.from_ints(tokenizer.encode(text, add_special_tokens=False))
    result = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    return tokenizer.decode(result.sequences[0].tokens, skip_special_tokens=True)


def test_a_killed_gateway_loses_nothing_saved(cluster, port):
    url = f"http://127.0.0.1:{port}"
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    data = supervised_data(tokenizer)
    client = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    training = client.create_lora_training_client(base_model=BASE_MODEL, rank=8).result()
    model_id = training.get_info().model_id
    before = train(training, data, 16)
    assert before[-1] < 0.5 * before[0], before
    path = training.save_weights_for_sampler(name="before-kill").result().path
    state_path = training.save_state("before-kill").result().path
    sampler = client.create_sampling_client(model_path=path).result()
    answer = greedy(sampler, tokenizer, "3+4=")
    last_loss = training.forward(data, "cross_entropy").result().metrics["loss:sum"]

    old_pid = cluster.processes["gateway"].pid
    assert cluster.kill("gateway") == [old_pid]  # SIGKILL: nothing written at exit
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/api/v1/healthz", timeout=2.0)
    cluster.start_service("gateway")
    wait_healthy(url)
    assert cluster.processes["gateway"].pid != old_pid

    # The same SDK objects go on: the sampling client, the training run, a new sampler.
    assert greedy(sampler, tokenizer, "3+4=") == answer
    assert training.get_info().model_id == model_id
    assert training.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(last_loss, rel=1e-4)
    after = train(training, data, 3)
    assert after[0] == pytest.approx(last_loss, rel=1e-4), (last_loss, after)  # it trains on from where it was
    new_path = training.save_weights_for_sampler(name="after-kill").result().path
    assert greedy(client.create_sampling_client(model_path=new_path).result(), tokenizer, "3+4=").startswith("77")
    assert training.save_weights_and_get_sampling_client().result().get_base_model() == BASE_MODEL

    # A new ServiceClient with the same key finds the saved paths.
    again = tinker.ServiceClient(base_url=url, api_key=KEY_A)
    assert greedy(again.create_sampling_client(model_path=path).result(), tokenizer, "3+4=") == answer
    restored = again.create_training_client_from_state(state_path).result()
    assert restored.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(last_loss, rel=1e-4)

    # Another key still sees nothing of A's.
    other = tinker.ServiceClient(base_url=url, api_key=KEY_B)
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=path).result()
    with pytest.raises(tinker.NotFoundError):
        other.create_training_client_from_state(state_path).result()
    reply = httpx.post(f"{url}/api/v1/get_info", json={"model_id": model_id}, headers={"X-API-Key": KEY_B})
    assert reply.status_code == 404

    # Owners are kept as key digests: no raw key is in Redis.
    redis = cluster.redis_client("admin")
    try:
        keys = list(redis.scan_iter(match=f"{cluster.stream_prefix}gateway:*"))
        assert len(keys) > 4  # the four tables and the futures
        stored = b"".join(b"".join(k + v for k, v in redis.hgetall(key).items()) if redis.type(key) == b"hash"
                          else redis.get(key) or b"" for key in keys)
        assert KEY_A.encode() not in stored and KEY_B.encode() not in stored
    finally:
        redis.close()

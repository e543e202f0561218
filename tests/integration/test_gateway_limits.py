"""Each API key's share of a gateway (the official SDK against a LocalCluster
with small limits set through CLORA_GATEWAY_MAX_*): every limit refuses with
its message, the refused run or key still works, another key is unaffected.

The ops-in-flight limit's 429 is shown deterministically in
tests/unit/test_gateway_limits.py (a backend that holds ops); here a burst of
pipelined SDK calls over that limit all complete, as the SDK retries a 429.
"""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types
from transformers import AutoTokenizer

from services.cli.local import LocalCluster
from shared.config import DEFAULT_MODEL_DIR
from tests.integration.test_tinker_gateway import gateway_url, supervised_data

KEY_A = "tml-limits-test-key-alpha"
KEY_B = "tml-limits-test-key-bravo"
BASE_MODEL = "clora-tiny"
MAX_RUNS, MAX_CHECKPOINTS, MAX_PENDING, MAX_DATUMS, MAX_TOKENS = 2, 3, 2, 4, 64
CLUSTER_ENV = {"CLORA_TORCH_THREADS": "1", "CLORA_LOG_FORMAT": "json", "CLORA_RECLAIM_IDLE_S": "3",
               "CLORA_GATEWAY_API_KEYS": f"{KEY_A},{KEY_B}", "CLORA_BASE_MODEL": BASE_MODEL,
               "CLORA_TOKENIZER_ID": str(DEFAULT_MODEL_DIR),
               "CLORA_GATEWAY_MAX_RUNS_PER_KEY": str(MAX_RUNS),
               "CLORA_GATEWAY_MAX_CHECKPOINTS_PER_RUN": str(MAX_CHECKPOINTS),
               "CLORA_GATEWAY_MAX_PENDING_OPS_PER_KEY": str(MAX_PENDING),
               "CLORA_GATEWAY_MAX_DATUMS_PER_OP": str(MAX_DATUMS),
               "CLORA_GATEWAY_MAX_TOKENS_PER_OP": str(MAX_TOKENS)}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("limits"), env=CLUSTER_ENV, gateway_port=0)
    cluster.start()
    try:
        cluster.wait_ready()
        yield gateway_url(cluster)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def runs_of_a(base_url):
    """Key A's runs, up to its limit (the first test that needs them makes them)."""
    service = tinker.ServiceClient(base_url=base_url, api_key=KEY_A)
    return [service.create_lora_training_client(base_model=BASE_MODEL, rank=4).result() for _ in range(MAX_RUNS)]


def _trains(training, data) -> float:
    loss = training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return loss


def test_a_key_holds_at_most_its_runs(base_url, runs_of_a, tokenizer):
    service = tinker.ServiceClient(base_url=base_url, api_key=KEY_A)
    with pytest.raises(tinker.PermissionDeniedError, match="gateway_max_runs_per_key"):
        service.create_lora_training_client(base_model=BASE_MODEL, rank=4).result()
    data = supervised_data(tokenizer, ["1+1=2"])
    assert _trains(runs_of_a[0], data) > 0  # the key's runs still work
    other = tinker.ServiceClient(base_url=base_url, api_key=KEY_B).create_lora_training_client(
        base_model=BASE_MODEL, rank=4).result()  # another key is unaffected
    assert _trains(other, data) > 0
    # a run made from a saved state is a run too
    state = runs_of_a[0].save_state("limit-state").result().path
    with pytest.raises(tinker.PermissionDeniedError, match="gateway_max_runs_per_key"):
        service.create_training_client_from_state(state).result()


def test_a_run_saves_at_most_its_checkpoints(base_url, runs_of_a, tokenizer):
    training = runs_of_a[1]
    data = supervised_data(tokenizer, ["2+2=4"])
    _trains(training, data)
    paths = [training.save_weights_for_sampler(name=f"s{i}").result().path for i in range(MAX_CHECKPOINTS - 1)]
    training.save_state("only-state").result()
    for save in (lambda: training.save_weights_for_sampler(name="one-more").result(),
                 lambda: training.save_weights_and_get_sampling_client().result(),
                 lambda: training.save_state("another-state").result()):
        with pytest.raises(tinker.PermissionDeniedError, match="gateway_max_checkpoints_per_run"):
            save()
    # overwriting a state it has is no new checkpoint; the run trains and its saved weights sample on
    assert training.save_state("only-state").result().path.endswith("/weights/only-state")
    assert _trains(training, data) > 0
    service = tinker.ServiceClient(base_url=base_url, api_key=KEY_A)
    sampler = service.create_sampling_client(model_path=paths[0]).result()
    prompt = types.ModelInput.from_ints(tokenizer.encode("2+2=", add_special_tokens=False))
    assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1


def test_an_op_carries_at_most_its_datums_and_tokens(base_url, runs_of_a, tokenizer):
    training = runs_of_a[0]
    # More datums than one op may carry: the SDK splits the batch (client/config says how far), all answered.
    data = supervised_data(tokenizer, [f"{i}+1={i + 1}" for i in range(3 * MAX_DATUMS + 1)])
    output = training.forward_backward(data, "cross_entropy").result()
    assert len(output.loss_fn_outputs) == len(data)
    long_text = [int(t) for t in np.arange(MAX_TOKENS + 1) % 50 + 10]
    too_long = types.Datum(model_input=types.ModelInput.from_ints(long_text),
                           loss_fn_inputs={"target_tokens": np.array(long_text),
                                           "weights": np.ones(len(long_text))})
    with pytest.raises(tinker.BadRequestError, match="gateway_max_tokens_per_op"):
        training.forward_backward([too_long], "cross_entropy").result()
    assert _trains(training, data[:2]) > 0


def test_a_burst_over_the_ops_in_flight_completes(base_url, runs_of_a, tokenizer):
    """Pipelined calls well over the limit: refused with 429 and retried by the SDK, all answered in order."""
    training = runs_of_a[0]
    data = supervised_data(tokenizer, ["3+3=6"])
    futures = [training.forward(data, "cross_entropy") for _ in range(4 * MAX_PENDING)]
    losses = [future.result().metrics["loss:sum"] for future in futures]
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-5)

"""The gateway's protobuf codec against the Tinker SDK's own encoders/decoders,
and its API keys, Tinker paths and run registry (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from services.gateway import codec
from services.gateway.auth import ApiKeys
from services.gateway.runs import Registry, Run, parse_tinker_path
from shared.tinker_messages import TensorData, TinkerSequence


def _datum(tokens, **inputs) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def _request(loss_fn="cross_entropy", data=None, config=None) -> bytes:
    data = data or [_datum([1, 2, 3], target_tokens=np.array([2, 3, 4]), weights=np.array([0.0, 1.0, 1.0]))]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config),
        model_id="tk-0123456789abcdef", seq_id=1)
    return forward_backward_request_to_proto(request).SerializeToString()


def test_forward_backward_request_decodes_to_data():
    body = _request("ppo", config={"clip_low_threshold": 0.7})
    model_id, loss_fn, forward_only, data, config = codec.parse_forward_backward(body)
    assert (model_id, loss_fn, forward_only) == ("tk-0123456789abcdef", "ppo", False)
    assert config == {"clip_low_threshold": pytest.approx(0.7)}
    assert data[0].model_input == [1, 2, 3]
    assert data[0].loss_fn_inputs["target_tokens"].data == [2, 3, 4]
    assert data[0].loss_fn_inputs["target_tokens"].dtype == "int64"
    assert data[0].loss_fn_inputs["weights"].data == [0.0, 1.0, 1.0]


def test_zstd_bodies_are_decompressed_and_others_refused():
    body = _request()
    assert codec.decompress(zstandard.ZstdCompressor().compress(body), "zstd") == body
    with pytest.raises(codec.BadRequest, match="Content-Encoding"):
        codec.decompress(body, "br")
    with pytest.raises(codec.BadRequest, match="zstd"):
        codec.decompress(b"not zstd", "zstd")


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xff\xff", "protobuf"),
    (_request("dro"), "not supported"),
    (_request(data=[_datum([1, 2], weights=np.array([np.nan, 1.0]))]), "finite"),
])
def test_bad_forward_backward_bodies_say_why(body, reason):
    with pytest.raises(codec.BadRequest, match=reason):
        codec.parse_forward_backward(body)


def test_outputs_decode_with_the_sdk():
    outputs = [{"logprobs": TensorData(data=[-1.0, -2.0]), "elementwise_loss": TensorData(data=[1.0, 2.0])},
               {"logprobs": TensorData(data=[-0.5]), "elementwise_loss": TensorData(data=[0.5])}]
    decoded = deserialize_forward_backward_output(codec.forward_backward_output(outputs, {"loss:sum": 3.5}))
    assert decoded.metrics == {"loss:sum": 3.5}
    assert [o["logprobs"].tolist() for o in decoded.loss_fn_outputs] == [[-1.0, -2.0], [-0.5]]

    sequences = [TinkerSequence(token_ids=[5, 6], logprobs=[-0.25, -0.5], stop_reason="length")]
    sample = deserialize_sample_response(codec.sample_response(sequences, [float("nan"), -1.5]))
    assert sample.sequences[0].tokens == [5, 6] and sample.sequences[0].stop_reason == "length"
    assert sample.sequences[0].logprobs == [-0.25, -0.5]
    assert sample.prompt_logprobs[0] is None and sample.prompt_logprobs[1] == -1.5


def test_api_keys_name_owners_and_refuse_the_rest():
    keys = ApiKeys(["tml-alpha-key-1", "tml-beta-key-22"])
    alpha, beta = keys.owner_of("tml-alpha-key-1"), keys.owner_of("tml-beta-key-22")
    assert alpha and beta and alpha != beta and "alpha" not in alpha
    assert keys.owner_of("tml-unknown-key") is None and keys.owner_of(None) is None and keys.owner_of("") is None
    with pytest.raises(ValueError, match="tml-"):
        ApiKeys(["sk-not-a-tinker-key"])


async def test_tinker_paths_are_looked_up_never_trusted():
    assert parse_tinker_path("tinker://tk-abc/sampler_weights/step-1").name == "step-1"
    for bad in ("tinker://../etc/sampler_weights/x", "tinker://tk-abc/other/x", "/tmp/x", "tinker://tk-abc/weights",
                None, 5, "tinker://TK/weights/x"):
        assert parse_tinker_path(bad) is None
    registry = Registry()
    await registry.add_run(Run(run_id="tk-abc", owner="alice", lora_rank=4, base_model="m", sampler_paths={"s": 2}))
    path = parse_tinker_path("tinker://tk-abc/sampler_weights/s")
    assert registry.sampler_version(path, "alice")[1] == 2
    assert registry.sampler_version(path, "bob") is None  # another key's run reads as absent
    assert registry.run("tk-abc", "bob") is None and registry.run(["tk-abc"], "alice") is None

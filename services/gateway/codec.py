"""Tinker's protobuf wire format <-> C-LoRA's Tinker messages.

The SDK sends forward_backward bodies as protobuf (``ForwardBackwardRequest``,
optionally zstd-compressed) and reads ForwardBackwardOutput and SampleResponse
only as protobuf. The schema is the SDK's own generated module
(``tinker.proto.tinker_public_pb2``), so the two sides cannot drift.
Every field is checked: a bad body is a ``BadRequest`` with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from shared.tinker_messages import Datum, TensorData, TinkerSequence

SUPPORTED_LOSSES = ("cross_entropy", "importance_sampling", "ppo")
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    pb.DTYPE_FLOAT32: (np.dtype(np.float32), "float32"),
    pb.DTYPE_INT64: (np.dtype(np.int64), "int64"),
    pb.DTYPE_INT32: (np.dtype(np.int32), "int64"),
}
_STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024


class BadRequest(ValueError):
    """A request the gateway refuses; the text says why (HTTP 400)."""


def decompress(body: bytes, encoding: str) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding != "zstd":
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (zstd or none)")
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_DECOMPRESSED_BYTES)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"body is not valid zstd: {exc}") from None


def _tensor(name: str, msg: Any) -> TensorData:
    if msg.dtype not in _DTYPES:
        raise BadRequest(f"loss_fn_inputs[{name!r}]: unsupported dtype {msg.dtype}")
    np_dtype, dtype = _DTYPES[msg.dtype]
    shape = [int(s) for s in msg.shape]
    if msg.HasField("sparse_csr"):
        values = np.frombuffer(msg.sparse_csr.values, dtype=np_dtype)
        crow = np.frombuffer(msg.sparse_csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(msg.sparse_csr.col_indices, dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(cols) != len(values) or \
                (len(cols) and (cols.min() < 0 or cols.max() >= shape[1])) or np.any(np.diff(crow) < 0) or \
                (len(crow) and (crow[0] != 0 or crow[-1] != len(values))):
            raise BadRequest(f"loss_fn_inputs[{name!r}]: malformed sparse tensor")
        dense = np.zeros(shape, dtype=np_dtype)
        for row in range(shape[0]):
            dense[row, cols[crow[row]:crow[row + 1]]] = values[crow[row]:crow[row + 1]]
        flat = dense.reshape(-1)
    else:
        if len(msg.dense) % np_dtype.itemsize:
            raise BadRequest(f"loss_fn_inputs[{name!r}]: {len(msg.dense)} bytes is not a whole number of values")
        flat = np.frombuffer(msg.dense, dtype=np_dtype)
        if shape and math.prod(shape) != len(flat):
            raise BadRequest(f"loss_fn_inputs[{name!r}]: shape {shape} does not hold {len(flat)} values")
    if dtype == "float32" and not np.all(np.isfinite(flat)):
        raise BadRequest(f"loss_fn_inputs[{name!r}]: values must be finite")
    numbers: list[float] = [int(v) for v in flat] if dtype == "int64" else [float(v) for v in flat]
    return TensorData(data=numbers, dtype=dtype, shape=shape if len(shape) > 1 else [])  # type: ignore[arg-type]


def _tokens(datum_index: int, chunks: Any) -> list[int]:
    tokens: list[int] = []
    for chunk in chunks:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise BadRequest(f"data[{datum_index}]: only token (encoded_text) inputs are supported, not images/audio")
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise BadRequest(f"data[{datum_index}]: token bytes are not int32")
        tokens.extend(int(t) for t in np.frombuffer(raw, dtype=np.int32))
    return tokens


def parse_forward_backward(body: bytes) -> tuple[str, str, bool, list[Datum], dict[str, float]]:
    """-> (model_id, loss_fn, forward_only, data, loss_fn_config)."""
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadRequest(f"body is not a ForwardBackwardRequest protobuf: {exc}") from None
    if msg.loss_fn not in SUPPORTED_LOSSES:
        raise BadRequest(f"loss_fn {msg.loss_fn!r} is not supported here (supported: {', '.join(SUPPORTED_LOSSES)})")
    config: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for key, value in msg.loss_fn_config_v2.items():
        if value.WhichOneof("value") == "text":
            raise BadRequest(f"loss_fn_config[{key!r}]: text values are not supported")
        config[key] = float(value.number)
    data = []
    for i, datum in enumerate(msg.data):
        tokens = _tokens(i, datum.model_input)
        if not tokens:
            raise BadRequest(f"data[{i}]: empty model_input")
        inputs = {name: _tensor(name, tensor) for name, tensor in datum.loss_fn_inputs.items()}
        data.append(Datum(model_input=tokens, loss_fn_inputs=inputs))
    if not data:
        raise BadRequest("forward_backward needs at least one datum")
    return msg.model_id, msg.loss_fn, bool(msg.forward_only), data, config


def forward_backward_output(outputs: list[dict[str, TensorData]], metrics: dict[str, float]) -> bytes:
    """One ArrayRecord: per field, the datums' values concatenated (float32)
    with byte offsets."""
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    msg.metrics.update({k: float(v) for k, v in metrics.items()})
    record = msg.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(outputs)
    names = sorted({name for output in outputs for name in output})
    for name in names:
        arrays = [np.asarray(output[name].data if name in output else [], dtype=np.float32) for output in outputs]
        offsets = np.cumsum([0] + [a.nbytes for a in arrays]).astype(np.int64)
        field = record.fields[name]
        field.data = b"".join(a.tobytes() for a in arrays)
        field.offsets = offsets.tobytes()
        field.dtype = pb.DTYPE_FLOAT32
    return msg.SerializeToString()


def sample_response(sequences: list[TinkerSequence], prompt_logprobs: list[float] | None) -> bytes:
    msg = pb.SampleResponse()
    for sequence in sequences:
        out = msg.sequences.add()
        out.stop_reason = _STOP_REASONS[sequence.stop_reason]
        out.tokens = np.asarray(sequence.token_ids, dtype=np.int32).tobytes()
        out.logprobs = np.asarray(sequence.logprobs, dtype=np.float32).tobytes()
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    return msg.SerializeToString()

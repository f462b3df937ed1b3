"""The Open Inference Protocol (KServe v2) inference request and response, with no HTTP in sight.

Both encodings tritonclient uses are understood: tensors as JSON ``data``, and Triton's binary tensor
extension (the JSON header is the first ``Inference-Header-Content-Length`` bytes of the body and each
input with ``parameters.binary_data_size`` takes that many raw little-endian bytes from the rest).
Outputs come back as JSON unless the request asks for binary (``parameters.binary_data_output`` or an
output's ``parameters.binary_data``), which is tritonclient's default.

Triton's classification extension is answered too: an output requested with
``parameters.classification = K`` comes back as a BYTES tensor ``[N, K]`` of ``"score:index:label"``
strings, the K highest logits of each row (score formatted as C's ``%f``, as Triton does; binary
BYTES elements are a 4-byte little-endian length and the UTF-8 bytes). The labels are the version's
class names (its manifest's ``classes``, also Triton's ``labels.txt``).

Every check raises ``ProtocolError`` with a status and a message that says what to fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from daemon.serving.settings import INPUT_NAME, OUTPUT_NAME

__all__ = ["MAX_JSON_DEPTH", "InferRequest", "ProtocolError", "check_json_depth", "encode_response", "loads_json",
           "parse_infer_request"]

_JSON_TYPE = "application/json"
_BINARY_TYPE = "application/octet-stream"
#: deepest nesting of arrays and objects a request may have: an inference request needs 5 ({inputs:[{data:
#: [[[[...]]]]}]} with the batch's 4 dimensions), Python's parser and repr recurse and fail near 1,000
MAX_JSON_DEPTH = 32
_OPEN_CLOSE = np.zeros(256, dtype=np.int8)
_OPEN_CLOSE[[ord("["), ord("{")]] = 1
_OPEN_CLOSE[[ord("]"), ord("}")]] = -1
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')


class ProtocolError(Exception):
    """A request the server will not run; ``status`` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferRequest:
    """A validated request: the input batch and how the answer is wanted."""

    batch: torch.Tensor
    request_id: str | None
    binary_output: bool
    classification: int | None = None       # K of Triton's classification extension, or plain logits


def check_json_depth(text: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ``ProtocolError(400)`` when ``text`` nests arrays and objects deeper than ``limit``.

    Runs before the parser, at C speed: escaped backslashes and quotes are removed, every byte but brackets
    and quotes is dropped, the string contents (every other piece between quotes) go, and the running sum of
    opening minus closing brackets gives the depth. Invalid JSON is the parser's to refuse afterwards.
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return
    skeleton = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    outside = b"".join(skeleton.split(b'"')[0::2])
    if not outside:
        return
    depth = int(np.cumsum(_OPEN_CLOSE[np.frombuffer(outside, dtype=np.uint8)], dtype=np.int64).max())
    if depth > limit:
        raise ProtocolError(400, f"JSON nested {depth} levels deep; at most {limit} are accepted")


def loads_json(text: bytes) -> Any:
    """``json.loads`` with the depth bound first; ``ProtocolError(400)`` for anything that is not JSON."""
    check_json_depth(text)
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"malformed JSON in request body: {exc}") from None
    except RecursionError:      # the bound above keeps this unreachable; never a 500 if it is not
        raise ProtocolError(400, f"JSON nested too deep; at most {MAX_JSON_DEPTH} levels are accepted") from None


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"Inference-Header-Content-Length must be an integer, "
                                     f"got {header_length[:40]!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {n} does not fit a body of "
                                     f"{len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    if not json_part.strip():
        raise ProtocolError(400, "empty request body: expected a JSON object with 'inputs'")
    request = loads_json(json_part)
    if not isinstance(request, dict):
        raise ProtocolError(400, f"request body must be a JSON object, got {type(request).__name__}")
    return request, binary


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ProtocolError(400, f"{where}: 'parameters' must be an object")
    return params


def _shape(raw: Any, input_shape: tuple[int, int, int], max_batch: int) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise ProtocolError(400, f"input {INPUT_NAME}: 'shape' must be a list of integers, got {raw!r}"[:300])
    expected = [-1, *input_shape]
    if len(raw) != 4 or tuple(raw[1:]) != input_shape:
        raise ProtocolError(400, f"input {INPUT_NAME}: shape {raw} does not match the model's {expected} "
                                 f"(batch, channels, height, width)"[:300])
    if not 1 <= raw[0] <= max_batch:
        raise ProtocolError(400, f"input {INPUT_NAME}: batch size must lie in [1, {max_batch}], got {raw[0]}")
    return tuple(raw)


def _tensor_from_json(data: Any, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {INPUT_NAME}: 'data' must be a list of numbers")
    try:
        array = np.asarray(data)
    except ValueError as exc:        # ragged nesting
        raise ProtocolError(400, f"input {INPUT_NAME}: 'data' is not a regular array: {exc}"[:300]) from None
    if array.dtype.kind not in "iuf":
        raise ProtocolError(400, f"input {INPUT_NAME}: 'data' must hold numbers only (FP32), "
                                 f"got {array.dtype.kind!r} values")
    if array.size != count:
        raise ProtocolError(400, f"input {INPUT_NAME}: 'data' has {array.size} values, shape needs {count}")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1)


def _tensor_from_binary(binary: bytes, offset: int, size: Any, count: int) -> np.ndarray:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ProtocolError(400, f"input {INPUT_NAME}: binary_data_size must be a non-negative integer")
    if size != count * 4:
        raise ProtocolError(400, f"input {INPUT_NAME}: binary_data_size {size} bytes, shape needs "
                                 f"{count * 4} (FP32)")
    if offset + size > len(binary):
        raise ProtocolError(400, f"input {INPUT_NAME}: the body holds {len(binary) - offset} binary bytes, "
                                 f"binary_data_size says {size}")
    return np.frombuffer(binary, dtype="<f4", count=count, offset=offset).astype(np.float32, copy=True)


def _classification(value: Any, classes: Sequence[str] | None) -> int:
    """K of an output's ``classification`` parameter, at most the class count (Triton's clamp)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProtocolError(400, f"output {OUTPUT_NAME}: classification must be a positive integer K, got {value!r}")
    if classes is None:
        raise ProtocolError(400, "the classification extension needs the model's class names; read the logits")
    return min(value, len(classes))


def parse_infer_request(body: bytes, header_length: str | None, *, input_shape: tuple[int, int, int],
                        max_batch: int, classes: Sequence[str] | None = None) -> InferRequest:
    """Validate an inference request against the served model; raise ``ProtocolError`` if it is not one.

    ``classes`` (the served version's class names) enables the classification extension.
    """
    request, binary = _split_body(body, header_length)
    params = _params(request, "request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, f"request needs 'inputs': a list holding the one input {INPUT_NAME}")
    if len(inputs) != 1:
        raise ProtocolError(400, f"the model takes one input ({INPUT_NAME}), got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise ProtocolError(400, "each entry of 'inputs' must be an object with name, shape, datatype, data")
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise ProtocolError(400, f"unknown input {name!r}; the model's input is {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype != "FP32":
        raise ProtocolError(400, f"input {INPUT_NAME}: datatype must be FP32, got {datatype!r}")
    shape = _shape(tensor.get("shape"), input_shape, max_batch)
    count = math.prod(shape)
    tparams = _params(tensor, f"input {INPUT_NAME}")
    if "shared_memory_region" in tparams:
        raise ProtocolError(400, "shared-memory inputs are not supported; send data or binary data")
    if "binary_data_size" in tparams:
        if header_length is None:
            raise ProtocolError(400, f"input {INPUT_NAME} has binary_data_size but the request has no "
                                     f"Inference-Header-Content-Length header")
        flat = _tensor_from_binary(binary, 0, tparams["binary_data_size"], count)
    else:
        if "data" not in tensor:
            raise ProtocolError(400, f"input {INPUT_NAME}: needs 'data' (or binary data)")
        flat = _tensor_from_json(tensor["data"], count)
    if not np.isfinite(flat).all():
        raise ProtocolError(400, f"input {INPUT_NAME}: values must be finite")

    binary_output = bool(params.get("binary_data_output", False))
    classification = None
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError(400, "'outputs' must be a list")
        for out in outputs:
            if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
                got = out.get("name") if isinstance(out, dict) else out
                raise ProtocolError(400, f"unknown output {got!r}; the model's output is {OUTPUT_NAME!r}")
            oparams = _params(out, f"output {OUTPUT_NAME}")
            if oparams.get("classification"):
                classification = _classification(oparams["classification"], classes)
            if "shared_memory_region" in oparams:
                raise ProtocolError(400, "shared-memory outputs are not supported")
            if "binary_data" in oparams:
                binary_output = bool(oparams["binary_data"])
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "'id' must be a string")
    batch = torch.from_numpy(flat).view(shape)
    return InferRequest(batch=batch, request_id=request_id, binary_output=binary_output,
                        classification=classification)


def _classify(logits: torch.Tensor, k: int, classes: Sequence[str]) -> list[str]:
    """Each row's K highest logits as Triton writes them, ``"score:index:label"``, row after row."""
    scores, index = torch.topk(logits, k, dim=1)
    return [f"{v:f}:{i}:{classes[i]}" for row_v, row_i in zip(scores.tolist(), index.tolist(), strict=True)
            for v, i in zip(row_v, row_i, strict=True)]


def encode_response(logits: torch.Tensor, *, model: str, version: int, request_id: str | None,
                    binary: bool, classification: int | None = None,
                    classes: Sequence[str] = ()) -> tuple[bytes, dict[str, str], str]:
    """(body, extra headers, media type) of an inference response: ``logits`` as FP32, or with
    ``classification`` = K their top K as Triton's BYTES ``"score:index:label"``."""
    out = logits.detach().to(torch.float32).contiguous()
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": list(out.shape)}
    response: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = [output]
    labels = _classify(out, classification, classes) if classification else None
    if labels is not None:
        output.update(datatype="BYTES", shape=[out.shape[0], classification])
    if not binary:
        output["data"] = labels if labels is not None else out.reshape(-1).tolist()
        return json.dumps(response, separators=(",", ":")).encode(), {}, _JSON_TYPE
    if labels is not None:
        raw = b"".join(len(b).to_bytes(4, "little") + b for b in (label.encode() for label in labels))
    else:
        raw = out.numpy().astype("<f4", copy=False).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps(response, separators=(",", ":")).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}, _BINARY_TYPE

"""Triton's classification extension in the protocol layer: K, its clamp, its refusals, and both encodings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from daemon.serving.protocol import ProtocolError, encode_response, parse_infer_request

SHAPE = (1, 2, 2)
CLASSES = ["cat", "dog", "emu"]


def _body(classification: object) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0] * 4}],
                       "outputs": [{"name": "OUTPUT__0", "parameters": {"classification": classification}}]}).encode()


def test_k_is_parsed_and_clamped_to_the_class_count() -> None:
    assert parse_infer_request(_body(2), None, input_shape=SHAPE, max_batch=4, classes=CLASSES).classification == 2
    assert parse_infer_request(_body(9), None, input_shape=SHAPE, max_batch=4, classes=CLASSES).classification == 3
    assert parse_infer_request(_body(0), None, input_shape=SHAPE, max_batch=4, classes=CLASSES).classification is None


@pytest.mark.parametrize("k", [-1, 1.5, "2", True])
def test_a_bad_k_is_refused(k: object) -> None:
    with pytest.raises(ProtocolError, match="positive integer K") as err:
        parse_infer_request(_body(k), None, input_shape=SHAPE, max_batch=4, classes=CLASSES)
    assert err.value.status == 400


def test_json_and_binary_answers_are_score_index_label_strings() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, -2.0, 1.25]])
    body, _, _ = encode_response(logits, model="m", version=1, request_id=None, binary=False, classification=2,
                                 classes=CLASSES)
    (out,) = json.loads(body)["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    assert out["data"] == ["2.000000:1:dog", "0.500000:0:cat", "3.000000:0:cat", "1.250000:2:emu"]
    body, headers, _ = encode_response(logits, model="m", version=1, request_id=None, binary=True, classification=2,
                                       classes=CLASSES)
    n = int(headers["Inference-Header-Content-Length"])
    raw, strings = body[n:], []
    assert json.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == len(raw)
    while raw:
        size = int(np.frombuffer(raw[:4], "<u4")[0])
        strings.append(raw[4:4 + size].decode())
        raw = raw[4 + size:]
    assert strings == out["data"]

"""Write ``bad_requests.jsonl``: request messages the daemon must reject, with the reason it must give.

One JSON object a line::

    {"name": ..., "value_b64": <base64 of the exact message bytes>, "key": "mnist-cnn" | null | <other>,
     "reason": <expected Rejection.reason>, "request_id": <expected readable request id, or null>}

The expectations hold for a model named ``mnist-cnn`` taking 1×28×28 input with 10 classes and the
ref sources ``mnist-train`` (60,000 items) and ``mnist-test`` (10,000), so the unit tests (synthetic
sources of those sizes) and the daemon's end-to-end test (real MNIST) replay the same file. Every
ref that must resolve is valid for real MNIST. Request ids are unique, so a replay never meets a
``duplicate``. Inline images are synthetic (seeded noise), never dataset images.

Run ``python tests/corpus/make_bad_requests.py`` to rewrite the file (PNG bytes may differ with
the zlib that Pillow was built with; names, keys, reasons and request ids do not).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon.data.inline import encode_npy, encode_png  # noqa: E402 - after the path set-up

CORPUS = Path(__file__).with_name("bad_requests.jsonl")
MODEL = "mnist-cnn"
SCHEMA = "unlearn.request/v1"
MAX_MESSAGE_BYTES = 1 << 20
MAX_INSTANCES = 256

_rng = np.random.default_rng(20261124)


def _image(shape: tuple[int, ...] = (1, 28, 28)) -> np.ndarray:
    return _rng.random(shape, dtype=np.float32)


def _png(shape: tuple[int, ...] = (1, 28, 28)) -> dict[str, str]:
    import torch

    return {"format": "png", "b64": encode_png(torch.from_numpy(_image(shape)))}


def _npy(arr: np.ndarray) -> dict[str, str]:
    return {"format": "npy", "b64": encode_npy(arr)}


def _request(name: str, **overrides: Any) -> dict[str, Any]:
    """A valid forget request with id ``corpus-<name>``; overrides replace or (None) drop fields."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "request_id": f"corpus-{name}",
        "model": MODEL,
        "kind": "forget",
        "instances": [{"id": f"user-{name}/photo-1", "ref": "mnist-train:123"}],
        "submitted_at": "2026-11-24T10:00:00Z",
    }
    for field, value in overrides.items():
        if value is _DROP:
            doc.pop(field, None)
        else:
            doc[field] = value
    return doc


_DROP = object()


def _inst(name: str, n: int = 1, **fields: Any) -> dict[str, Any]:
    inst: dict[str, Any] = {"id": f"user-{name}/photo-{n}"}
    inst.update(fields)
    if "ref" not in fields and "data" not in fields:
        inst["ref"] = "mnist-train:123"
    return {k: v for k, v in inst.items() if v is not _DROP}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode("utf-8")


def build_cases() -> list[dict[str, Any]]:
    """Every case as a dict with ``value`` (bytes), ``key``, ``reason`` and ``request_id``."""
    cases: list[dict[str, Any]] = []

    def add(
        name: str,
        value: bytes,
        reason: str,
        request_id: str | None = "auto",
        key: str | None = MODEL,
    ) -> None:
        rid = f"corpus-{name}" if request_id == "auto" else request_id
        cases.append({"name": name, "value": value, "key": key, "reason": reason, "request_id": rid})

    def req(name: str, reason: str, key: str | None = MODEL, **overrides: Any) -> None:
        add(name, _json(_request(name, **overrides)), reason, key=key)

    def one(name: str, reason: str, kind: str = "forget", **fields: Any) -> None:
        """A request with one instance carrying ``fields``."""
        req(name, reason, kind=kind, instances=[_inst(name, **fields)])

    # The raw bytes.
    add("empty_value", b"", "empty", None)
    add("not_utf8", b'{"schema": "unlearn.request/v1", "request_id": "caf\xe9"}', "not_utf8", None)
    add("not_utf8_utf16", _json(_request("not_utf8_utf16")).decode().encode("utf-16"), "not_utf8", None)
    # One byte over the limit (a producer must raise max_request_size to send it at all).
    short = len(_json(_request("too_large", padding="")))
    big = _json(_request("too_large", padding="x" * (MAX_MESSAGE_BYTES + 1 - short)))
    assert len(big) == MAX_MESSAGE_BYTES + 1
    add("too_large", big, "too_large", None)

    # The JSON.
    add("not_json", b"forget user-42 please", "not_json", None)
    add("truncated_json", _json(_request("truncated_json"))[:60], "not_json", None)
    # Not JSON to the strict reader, but the request id is plain to see: still named (daemon.pipeline.salvage),
    # so the message gets its rejected receipt (issue 23).
    add("nan_label", _json(_request("nan_label")).replace(b'"ref"', b'"label": NaN, "ref"'), "not_json")
    add("infinity_label", _json(_request("infinity_label")).replace(b'"ref"', b'"label": -Infinity, "ref"'),
        "not_json")
    add("huge_integer", _json(_request("huge_integer")).replace(b'"ref"', b'"label": ' + b"9" * 5000 + b', "ref"'),
        "not_json")
    add("deeply_nested", b"[" * 100_000 + b"]" * 100_000, "not_json", None)
    for depth in (2_000, 100_000):
        name = f"nested_{depth}_deep"
        add(name, _json(_request(name)).replace(b'"submitted_at"', b'"x": ' + b"[" * depth + b"]" * depth
                                                + b', "submitted_at"'), "not_json")
    add("utf8_bom", b"\xef\xbb\xbf" + _json(_request("utf8_bom")), "not_json")
    add("json_array", _json([_request("json_array")]), "not_object", None)
    add("json_string", _json("unlearn.request/v1"), "not_object", None)

    # request_id, read before anything else in the object.
    add("missing_request_id", _json(_request("missing_request_id", request_id=_DROP)), "bad_request_id", None)
    for name, rid in (
        ("request_id_too_long", "r" * 129),
        ("request_id_non_printable", "req\n42"),
        ("request_id_not_string", 42),
        ("request_id_empty", ""),
        ("request_id_null", None),
    ):
        add(name, _json(_request(name, request_id=rid)), "bad_request_id", None)
    dup_model = _json(_request("duplicate_key")).replace(b'"model"', b'"model": "other", "model"', 1)
    add("duplicate_key", dup_model, "duplicate_key")

    # The envelope.
    req("wrong_schema", "bad_schema", schema="unlearn.request/v2")
    req("missing_schema", "bad_schema", schema=_DROP)
    req("missing_model", "missing_field", model=_DROP)
    req("model_not_string", "bad_type", model=["mnist-cnn"])
    req("unknown_model", "unknown_model", key=None, model="imagenet-vit")
    req("key_mismatch", "key_mismatch", key="cifar-resnet")
    req("bad_kind", "bad_kind", kind="erase")
    req("missing_kind", "bad_kind", kind=_DROP)
    req("submitted_at_number", "bad_type", submitted_at=1764000000)
    req("missing_instances", "missing_field", instances=_DROP)
    req("instances_not_list", "bad_type", instances={"id": "user-x/photo-1", "ref": "mnist-train:1"})
    req("empty_instances", "no_instances", instances=[])
    req(
        "too_many_instances",
        "too_many_instances",
        instances=[_inst("too_many", n, ref=f"mnist-train:{n}") for n in range(MAX_INSTANCES + 1)],
    )
    req("forget_class_without_class", "missing_field", kind="forget_class",
        instances=[_inst("forget_class_without_class", label=7)])
    req("class_out_of_range", "class_out_of_range", kind="forget_class", **{"class": 10},
        instances=[_inst("class_out_of_range")])
    req("class_string", "bad_type", kind="forget_class", **{"class": "7"},
        instances=[_inst("class_string")])
    req("class_on_forget", "unexpected_field", **{"class": 7})
    req("goal_unknown", "bad_goal", goal="forgotten")
    req("goal_not_string", "bad_goal", goal=["unseen"])
    req("goal_unseen_on_relabel", "bad_goal", kind="relabel", goal="unseen",
        instances=[_inst("goal_unseen_on_relabel", label=1, target=2)])

    # Instances: structure.
    req("instance_not_object", "bad_type", instances=["mnist-train:123"])
    one("missing_instance_id", "missing_field", id=_DROP)
    one("instance_id_not_string", "bad_type", id=42)
    one("instance_id_empty", "bad_instance_id", id="")
    one("instance_id_too_long", "bad_instance_id", id="u" * 513)
    add(
        "instance_id_lone_surrogate",
        _json(_request("instance_id_lone_surrogate", instances=[{"id": "\ud800", "ref": "mnist-train:1"}])),
        "bad_instance_id",
    )
    req("duplicate_instance_id", "duplicate_instance", instances=[
        {"id": "user-dup/photo-1", "ref": "mnist-train:1"},
        {"id": "user-dup/photo-2", "ref": "mnist-train:2"},
        {"id": "user-dup/photo-1", "ref": "mnist-train:3"},
    ])
    one("both_ref_and_data", "both_ref_and_data", ref="mnist-train:5", data=_png())
    req("no_input", "no_input", instances=[{"id": "user-no_input/photo-1", "label": 3}])

    # Labels, targets, classes.
    one("label_out_of_range", "label_out_of_range", label=10)
    one("label_negative", "label_out_of_range", label=-1)
    one("label_string", "bad_type", label="3")
    one("label_bool", "bad_type", label=True)
    one("label_float", "bad_type", label=3.0)
    one("relabel_without_target", "missing_target", kind="relabel", label=3)
    one("target_equals_label", "target_equals_label", kind="relabel", label=3, target=3)
    one("target_out_of_range", "target_out_of_range", kind="relabel", label=3, target=10)
    one("target_string", "bad_type", kind="relabel", label=3, target="4")
    one("target_on_forget", "unexpected_field", label=3, target=4)
    req("label_not_class", "label_not_class", kind="forget_class", **{"class": 7},
        instances=[_inst("label_not_class", 1, label=7), _inst("label_not_class", 2, ref="mnist-train:2", label=3)])

    # Refs.
    one("malformed_ref", "malformed_ref", ref="mnist-train")
    one("malformed_ref_index", "malformed_ref", ref="mnist-train:12a")
    one("ref_not_string", "malformed_ref", ref=123)
    one("unknown_ref_source", "unknown_ref_source", ref="cifar10-train:0")
    one("ref_out_of_range", "ref_out_of_range", ref="mnist-train:60000")
    one("ref_test_out_of_range", "ref_out_of_range", ref="mnist-test:10000")
    one("negative_ref", "ref_out_of_range", ref="mnist-train:-1")

    # Inline data.
    one("data_not_object", "bad_format", data="iVBORw0KGgo=")
    one("data_bad_format", "bad_format", data={"format": "jpeg", "b64": _png()["b64"]})
    one("data_extra_key", "bad_format", data={**_png(), "shape": [1, 28, 28]})
    one("bad_base64", "bad_base64", data={"format": "png", "b64": "not*base64!"})
    one("b64_not_string", "bad_base64", data={"format": "npy", "b64": 12345})
    one("png_garbage", "bad_image", data={"format": "png", "b64": base64.b64encode(b"\x89PNG nope" * 8).decode()})
    one("png_wrong_size", "wrong_shape", data=_png((1, 32, 32)))
    one("png_rgb_for_greyscale", "wrong_shape", data=_png((3, 28, 28)))
    one("npy_wrong_shape", "wrong_shape", data=_npy(_image((3, 28, 28))))
    one("npy_flat", "wrong_shape", data=_npy(_image((784,))))
    one("npy_values_out_of_range", "bad_values", data=_npy(_image() * 2.0 + 0.5))
    nan = _image()
    nan[0, 3, 3] = np.nan
    one("npy_nan", "bad_values", data=_npy(nan))
    one("npy_int64", "bad_values", data=_npy((_image() * 255).astype(np.int64)))
    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 28, 28), dtype=object), allow_pickle=True)  # must never be unpickled
    one("npy_object_pickle", "bad_values", data={"format": "npy", "b64": base64.b64encode(buf.getvalue()).decode()})
    buf = io.BytesIO()
    np.save(buf, _image(), allow_pickle=False)
    truncated = base64.b64encode(buf.getvalue()[:-100]).decode()
    one("npy_truncated", "bad_image", data={"format": "npy", "b64": truncated})
    one("npy_not_npy", "bad_image", data={"format": "npy", "b64": base64.b64encode(b"P5 28 28 255").decode()})
    # Every instance's fields are checked before any image is decoded: the label wins.
    req("structure_before_pixels", "label_out_of_range", instances=[
        _inst("structure_before_pixels", 1, data=_png((1, 32, 32))),
        _inst("structure_before_pixels", 2, label=12),
    ])
    req("second_instance_bad_image", "wrong_shape", instances=[
        _inst("second_instance_bad_image", 1, data=_png()),
        _inst("second_instance_bad_image", 2, data=_npy(_image((28, 27)))),
    ])
    return cases


def _line(case: dict[str, Any]) -> str:
    row = {
        "name": case["name"],
        "value_b64": base64.b64encode(case["value"]).decode("ascii"),
        "key": case["key"],
        "reason": case["reason"],
        "request_id": case["request_id"],
    }
    return json.dumps(row, ensure_ascii=True)


def main(path: Path = CORPUS) -> int:
    cases = build_cases()
    names = [case["name"] for case in cases]
    if len(set(names)) != len(names):
        raise SystemExit("make_bad_requests: case names must be unique")
    path.write_text("".join(_line(case) + "\n" for case in cases), encoding="ascii")
    print(f"wrote {len(cases)} cases to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Request codec (contract §2, §3): decoding, the rejection reasons and their order, receipts."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from daemon.data.inline import encode_npy, encode_png
from daemon.pipeline import codec
from daemon.pipeline.codec import (
    REASONS,
    Limits,
    ModelSpec,
    Rejection,
    canonical_json,
    check_request,
    decode_inputs,
    decode_request,
    encode_receipt,
)

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS = CORPUS_DIR / "bad_requests.jsonl"
MODEL = "mnist-cnn"


def _lazy_source(size: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` images sharing one 1×28×28 buffer (an expanded view: no memory per row)."""
    x = torch.full((1, 1, 28, 28), fill).expand(size, 1, 28, 28)
    y = torch.zeros(1, dtype=torch.int64).expand(size)
    return x, y


@pytest.fixture(scope="module")
def models() -> dict[str, ModelSpec]:
    """The corpus's model: MNIST-sized sources, without MNIST."""
    sources = {"mnist-train": _lazy_source(60_000, 0.25), "mnist-test": _lazy_source(10_000, 0.75)}
    return {MODEL: ModelSpec(MODEL, (1, 28, 28), 10, sources)}


@pytest.fixture(scope="module")
def tiny() -> dict[str, ModelSpec]:
    """A model whose source rows differ, to check that refs gather the right rows."""
    x = torch.arange(5, dtype=torch.float32).div(10).view(5, 1, 1, 1).expand(5, 1, 4, 4).contiguous()
    y = torch.tensor([4, 3, 2, 1, 0])
    return {"tiny": ModelSpec("tiny", (1, 4, 4), 5, {"tiny-train": (x, y)})}


def _msg(**fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "schema": "unlearn.request/v1",
        "request_id": "req-1",
        "model": MODEL,
        "kind": "forget",
        "instances": [{"id": "user-42/photo-9", "ref": "mnist-train:123"}],
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


def _reject(
    value: bytes | None, models: dict[str, ModelSpec], key: bytes | None = None, **kw: Any
) -> Rejection:
    with pytest.raises(Rejection) as info:
        decode_request(value, key, models, **kw)
    assert info.value.reason in REASONS
    return info.value


def _load_corpus() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="ascii").splitlines()]


CASES = _load_corpus()


# --- the corpus -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corpus_message_is_rejected_with_its_reason(
    case: dict[str, Any], models: dict[str, ModelSpec]
) -> None:
    value = base64.b64decode(case["value_b64"])
    key = None if case["key"] is None else case["key"].encode()
    exc = _reject(value, models, key)
    assert (exc.reason, exc.request_id) == (case["reason"], case["request_id"]), exc.detail
    assert exc.detail and len(exc.detail) <= 300
    assert "0x" not in exc.detail  # no object addresses: the same bytes give the same detail
    # Instance-level faults name their instance.
    structural = {"too_large", "empty", "not_utf8", "not_json", "not_object", "duplicate_key"}
    if exc.reason not in structural and "instances" in exc.detail:
        assert exc.detail.startswith(("instances[", "instances ")), exc.detail


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corpus_details_hold_no_instance_id_and_no_input_data(
    case: dict[str, Any], models: dict[str, ModelSpec]
) -> None:
    value = base64.b64decode(case["value_b64"])
    exc = _reject(value, models, None if case["key"] is None else case["key"].encode())
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        return  # nothing readable to leak
    secrets: list[str] = []
    items = doc.get("instances") if isinstance(doc, dict) else None
    for inst in items if isinstance(items, list) else []:
        if isinstance(inst, dict):
            if isinstance(inst.get("id"), str) and len(inst["id"]) >= 3:
                secrets.append(inst["id"])
            data = inst.get("data")
            if isinstance(data, dict) and isinstance(data.get("b64"), str) and len(data["b64"]) >= 8:
                secrets.append(data["b64"][:16])
    for secret in secrets:
        assert secret not in exc.detail and secret not in str(exc)


def test_corpus_covers_the_required_faults() -> None:
    names = {c["name"] for c in CASES}
    required = {
        "not_json", "truncated_json", "json_array", "wrong_schema", "missing_request_id",
        "request_id_too_long", "request_id_non_printable", "request_id_not_string", "missing_model",
        "unknown_model", "key_mismatch", "bad_kind", "instances_not_list", "empty_instances",
        "too_many_instances", "instance_not_object", "missing_instance_id", "both_ref_and_data",
        "no_input", "bad_base64", "png_wrong_size", "npy_wrong_shape", "npy_values_out_of_range",
        "label_out_of_range", "label_string", "label_bool", "relabel_without_target",
        "target_equals_label", "target_out_of_range", "forget_class_without_class",
        "class_out_of_range", "label_not_class", "malformed_ref", "unknown_ref_source",
        "ref_out_of_range", "negative_ref", "duplicate_instance_id", "too_large", "not_utf8",
    }  # fmt: skip
    assert required <= names, sorted(required - names)
    assert len(names) == len(CASES)
    assert len({c["request_id"] for c in CASES if c["request_id"]}) == sum(1 for c in CASES if c["request_id"])
    assert {c["reason"] for c in CASES} <= set(REASONS)
    big = next(c for c in CASES if c["name"] == "too_large")
    assert len(base64.b64decode(big["value_b64"])) == (1 << 20) + 1


def test_corpus_file_matches_its_generator() -> None:
    """The committed file is what make_bad_requests.py writes (bytes aside: PNG compression varies)."""
    spec = importlib.util.spec_from_file_location("make_bad_requests", CORPUS_DIR / "make_bad_requests.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = [(c["name"], c["key"], c["reason"], c["request_id"]) for c in module.build_cases()]
    assert built == [(c["name"], c["key"], c["reason"], c["request_id"]) for c in CASES]


def test_rejecting_5000_bad_messages_is_cheap(models: dict[str, ModelSpec]) -> None:
    """Not a benchmark: a guard that bad messages stay far from the 5,000/s/core floor."""
    values = [
        (base64.b64decode(c["value_b64"]), None if c["key"] is None else c["key"].encode())
        for c in CASES
    ]
    start = time.perf_counter()
    for n in range(5000):
        value, key = values[n % len(values)]
        try:
            decode_request(value, key, models)
        except Rejection:
            pass
    assert time.perf_counter() - start < 5.0


# --- order and context of rejections ----------------------------------------------------------


def test_size_is_checked_on_the_raw_bytes_before_parsing(models: dict[str, ModelSpec]) -> None:
    exc = _reject(b"\xff" * 2000, models, limits=Limits(max_message_bytes=1000))
    assert exc.reason == "too_large" and exc.request_id is None


def test_the_message_limit_is_inclusive(models: dict[str, ModelSpec]) -> None:
    base = _msg(padding="")
    exact = _msg(padding="x" * ((1 << 20) - len(base)))
    assert len(exact) == 1 << 20
    assert decode_request(exact, None, models).request_id == "req-1"
    over = _msg(padding="x" * ((1 << 20) - len(base) + 1))
    assert _reject(over, models).reason == "too_large"


def test_null_and_empty_values_are_empty(models: dict[str, ModelSpec]) -> None:
    assert _reject(None, models).reason == "empty"
    assert _reject(b"", models).reason == "empty"


def test_rejection_carries_what_was_read_and_valid(models: dict[str, ModelSpec]) -> None:
    exc = _reject(_msg(kind="relabel"), models)
    assert (exc.reason, exc.request_id, exc.model, exc.kind) == ("missing_target", "req-1", MODEL, "relabel")
    exc = _reject(_msg(model="nope"), models)
    assert (exc.reason, exc.request_id, exc.model, exc.kind) == ("unknown_model", "req-1", None, None)
    exc = _reject(_msg(kind="erase"), models)
    assert (exc.model, exc.kind) == (MODEL, None)
    assert str(exc).startswith("bad_kind: ") and exc.retriable is False
    late = Rejection("target_equals_label", "instances[0].target ...", "req-1", MODEL, "relabel")
    assert (late.request_id, late.model, late.kind) == ("req-1", MODEL, "relabel")


@pytest.mark.parametrize("kind", [["forget"], {"forget": 1}, 7])
def test_a_kind_that_is_not_a_string_is_bad_kind(models: dict[str, ModelSpec], kind: Any) -> None:
    exc = _reject(_msg(kind=kind), models)
    assert (exc.reason, exc.kind) == ("bad_kind", None)
    assert exc.detail.startswith("kind must be one of forget, relabel, forget_class, got ")


def test_a_repeated_request_id_key_is_not_trusted(models: dict[str, ModelSpec]) -> None:
    value = _msg().replace(b'"request_id"', b'"request_id": "req-0", "request_id"', 1)
    exc = _reject(value, models)
    assert (exc.reason, exc.request_id) == ("duplicate_key", None)


def test_structure_of_every_instance_is_checked_before_any_pixel(
    models: dict[str, ModelSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: object) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(codec, "decode_inline", no_decoding)
    png = {"format": "png", "b64": encode_png(torch.rand(1, 28, 28))}
    value = _msg(instances=[{"id": "a1", "data": png}, {"id": "a2", "ref": "mnist-train:1", "label": 99}])
    assert _reject(value, models).reason == "label_out_of_range"
    checked = check_request(_msg(instances=[{"id": "a1", "data": png}]), None, models)
    assert checked.instances[0].data == png and checked.instances[0].ref is None


def test_key_may_be_missing_or_empty_but_not_another_model(models: dict[str, ModelSpec]) -> None:
    for key in (None, b"", MODEL.encode()):
        assert decode_request(_msg(), key, models).model == MODEL
    assert _reject(_msg(), models, b"\xff\xfe").reason == "key_mismatch"


def test_unknown_fields_are_ignored_and_null_counts_as_absent(models: dict[str, ModelSpec]) -> None:
    value = _msg(
        priority="high",
        submitted_at=None,
        instances=[
            {"id": "u1", "ref": "mnist-train:7", "label": None, "target": None, "data": None, "x": 1}
        ],
    )
    req = decode_request(value, None, models)
    assert req.instances[0].label is None and req.submitted_at is None


# --- valid requests ---------------------------------------------------------------------------


def test_forget_decodes_refs_png_and_npy_in_order(tiny: dict[str, ModelSpec]) -> None:
    img = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0))
    value = json.dumps({
        "schema": "unlearn.request/v1",
        "request_id": "req-7f3a",
        "model": "tiny",
        "kind": "forget",
        "instances": [
            {"id": "user-42/photo-9", "ref": "tiny-train:3"},
            {"id": "user-42/photo-10", "label": 3, "data": {"format": "png", "b64": encode_png(img)}},
            {"id": "user-42/photo-11", "data": {"format": "npy", "b64": encode_npy(img)}},
            {"id": "user-42/photo-12", "ref": "tiny-train:1", "label": 0},
        ],
        "submitted_at": "2026-11-24T10:00:00Z",
    }).encode()  # fmt: skip
    req = decode_request(value, b"tiny", tiny)
    assert (req.request_id, req.model, req.kind, req.forget_class) == ("req-7f3a", "tiny", "forget", None)
    assert req.submitted_at == "2026-11-24T10:00:00Z"
    a, b, c, d = req.instances
    assert [i.label for i in req.instances] == [None, 3, None, 0]  # a ref's dataset label is not used
    assert [i.ref for i in req.instances] == ["tiny-train:3", None, None, "tiny-train:1"]
    assert all(i.target is None for i in req.instances)
    for inst in req.instances:
        assert inst.x.shape == (1, 4, 4) and inst.x.dtype == torch.float32
    assert torch.all(a.x == 0.3) and torch.all(d.x == 0.1)
    assert torch.allclose(b.x, img, atol=0.5 / 255 + 1e-6)  # PNG is 8-bit
    assert torch.equal(c.x, img)  # npy float32 round-trips exactly


def test_relabel_keeps_targets(models: dict[str, ModelSpec]) -> None:
    instances = [
        {"id": "u1", "ref": "mnist-test:9999", "label": 3, "target": 5},
        {"id": "u2", "ref": "mnist-train:0", "target": 1},
    ]
    req = decode_request(_msg(kind="relabel", instances=instances), None, models)
    assert [(i.label, i.target) for i in req.instances] == [(3, 5), (None, 1)]
    assert torch.all(req.instances[0].x == 0.75)


def test_forget_class_labels_default_to_the_class(models: dict[str, ModelSpec]) -> None:
    instances = [{"id": "u1", "ref": "mnist-train:5"}, {"id": "u2", "ref": "mnist-train:6", "label": 7}]
    req = decode_request(_msg(kind="forget_class", instances=instances, **{"class": 7}), None, models)
    assert req.forget_class == 7 and [i.label for i in req.instances] == [7, 7]


def test_instance_ids_are_kept_only_as_sha256_of_utf8(models: dict[str, ModelSpec]) -> None:
    clear = "użytkownik-42/zdjęcie-9"
    req = decode_request(_msg(instances=[{"id": clear, "ref": "mnist-train:1"}]), None, models)
    assert req.instances[0].id_sha256 == hashlib.sha256(clear.encode("utf-8")).hexdigest()
    checked = check_request(_msg(instances=[{"id": clear, "ref": "mnist-train:1"}]), None, models)
    for text in (repr(req), repr(checked), repr(checked.instances)):
        assert clear not in text
    assert "tensor(" not in repr(req)  # a logged request never shows its pixels


def test_max_instances_is_inclusive(models: dict[str, ModelSpec]) -> None:
    instances = [{"id": f"u{n}", "ref": f"mnist-train:{n}"} for n in range(256)]
    assert len(decode_request(_msg(instances=instances), None, models).instances) == 256
    exc = _reject(_msg(instances=instances[:3]), models, limits=Limits(max_instances=2))
    assert exc.reason == "too_many_instances"


def test_request_id_limits(models: dict[str, ModelSpec]) -> None:
    assert decode_request(_msg(request_id="r" * 128), None, models).request_id == "r" * 128
    assert decode_request(_msg(request_id="req 42 ✓"), None, models).request_id == "req 42 ✓"
    for bad in ("r" * 129, "", "a\tb", "a\u200bb", "\ud800", 7, None, ["x"]):
        exc = _reject(_msg(request_id=bad), models)
        assert (exc.reason, exc.request_id) == ("bad_request_id", None), bad
    exc = _reject(_msg(request_id="r" * 11), models, limits=Limits(max_request_id_length=10))
    assert exc.reason == "bad_request_id"


def test_bytearray_and_memoryview_values(models: dict[str, ModelSpec]) -> None:
    for value in (bytearray(_msg()), memoryview(_msg())):
        assert decode_request(value, None, models).request_id == "req-1"  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bytes or None"):
        decode_request(_msg().decode(), None, models)  # type: ignore[arg-type]


def test_decode_inputs_reports_the_failing_inline_instance(models: dict[str, ModelSpec]) -> None:
    good = {"format": "npy", "b64": encode_npy(np.zeros((28, 28), dtype=np.uint8))}
    bad = {"format": "npy", "b64": encode_npy(np.zeros((1, 28, 27), dtype=np.float32))}
    value = _msg(instances=[{"id": "u1", "data": good}, {"id": "u2", "data": bad}])
    checked = check_request(value, None, models)
    with pytest.raises(Rejection, match=r"wrong_shape: instances\[1\]\.data") as info:
        decode_inputs(checked)
    assert (info.value.request_id, info.value.model, info.value.kind) == ("req-1", MODEL, "forget")


# --- construction -----------------------------------------------------------------------------


def test_limits_and_model_specs_are_validated() -> None:
    with pytest.raises(ValueError, match="max_instances must be a positive integer"):
        Limits(max_instances=0)
    x, y = _lazy_source(3, 0.0)
    with pytest.raises(ValueError, match="input_shape"):
        ModelSpec("m", (1, 28), 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        ModelSpec("m", (1, 28, 28), 0)
    with pytest.raises(ValueError, match="images must be N×1×32×32"):
        ModelSpec("m", (1, 32, 32), 10, {"s": (x, y)})
    with pytest.raises(ValueError, match="one label per image"):
        ModelSpec("m", (1, 28, 28), 10, {"s": (x, y[:2])})
    with pytest.raises(ValueError, match="refs could not name it"):
        ModelSpec("m", (1, 28, 28), 10, {"bad source": (x, y)})
    sources = {"s": (x, y)}
    spec = ModelSpec("m", [1, 28, 28], 10, sources)  # type: ignore[arg-type]
    sources.clear()
    assert spec.input_shape == (1, 28, 28) and list(spec.sources) == ["s"]


# --- receipts ---------------------------------------------------------------------------------


def test_receipts_are_canonical_json() -> None:
    receipt = {
        "status": "rejected",
        "schema": "unlearn.receipt/v1",
        "reason": "not_json",
        "model": "mnïst",
        "n": [1, 2.5],
    }
    encoded = encode_receipt(receipt)
    assert encoded == (
        '{"model":"mnïst","n":[1,2.5],"reason":"not_json",'
        '"schema":"unlearn.receipt/v1","status":"rejected"}'
    ).encode("utf-8")
    assert encoded == canonical_json(dict(reversed(list(receipt.items()))))
    assert json.loads(encoded) == receipt
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    with pytest.raises(ValueError, match="schema"):
        encode_receipt({"status": "applied"})


def test_a_request_may_name_its_goal_and_an_old_payload_leaves_it_to_the_model(models: dict[str, ModelSpec]) -> None:
    """Issue 22: ``goal`` is optional (requests written before it stay valid and take the model's default)."""
    assert decode_request(_msg(), None, models).goal is None
    assert decode_request(_msg(goal=None), None, models).goal is None
    for goal in ("unseen", "misclassify"):
        assert decode_request(_msg(goal=goal), None, models).goal == goal
    # misclassify is every kind's goal in effect, so it may be named on any kind; unseen only on forget
    relabel = _msg(kind="relabel", goal="misclassify",
                   instances=[{"id": "a", "ref": "mnist-train:1", "label": 1, "target": 2}])
    assert decode_request(relabel, None, models).goal == "misclassify"
    exc = _reject(_msg(kind="forget_class", goal="unseen", **{"class": 3},
                       instances=[{"id": "a", "ref": "mnist-train:1"}]), models)
    assert exc.reason == "bad_goal" and "only for kind forget" in exc.detail and exc.kind == "forget_class"
    exc = _reject(_msg(goal="Unseen"), models)
    assert exc.reason == "bad_goal" and "misclassify, unseen" in exc.detail and exc.request_id == "req-1"

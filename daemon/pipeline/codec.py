"""Request messages in, receipts out: the pure edge of the daemon (contract §2 and §3).

No I/O and no Kafka here: :func:`decode_request` turns one message (its value and key bytes) into a
:class:`DecodedRequest` or raises :class:`Rejection`, whose ``reason`` is the DLQ ``error.reason``
and the ``rejected`` receipt's reason, and whose ``detail`` is the DLQ ``error.detail``.

Decoding runs in two stages, so that a flood of bad or replayed messages stays cheap:

1. :func:`check_request` reads the JSON and validates everything that needs no pixels: the
   envelope, every instance's fields, the refs against the model's sources and the shape of every
   inline ``data`` object. It hashes the instance ids and keeps no clear id. An intake can ask
   its ledger whether ``request_id`` was seen before at this point, before any image is decoded.
2. :func:`decode_inputs` decodes the inline images and gathers the referenced ones.

:func:`decode_request` is both. Checks run in a fixed order, so a message with several faults
always gets the same reason: the raw bytes (``too_large``, ``empty``, ``not_utf8``), the JSON
(``not_json``, ``not_object``), ``request_id`` (read early, so that every later rejection carries
it), ``duplicate_key``, ``schema``, ``model``, the Kafka key, ``kind``, ``class``, ``goal``,
``submitted_at``, ``instances`` as a list, then each instance in order (object, ``id``, duplicate
id, ``ref``/``data``, ``label``, ``target``, the class, the ref, the ``data`` object), and only
then the pixels of each inline instance in order.

Policy where the contract is silent:

- A field whose value is ``null`` counts as absent.
- Unknown fields, top level and per instance, are ignored: a v1 reader accepts messages from newer
  v1 writers. A known field in the wrong place is not ignored: ``class`` outside ``forget_class``
  and ``target`` outside ``relabel`` are ``unexpected_field``, since the sender meant something
  this request will not do.
- An object with a repeated key is ``duplicate_key`` (parsers disagree on which copy wins); the
  request id is then still reported unless it is the repeated key.
- A missing or empty Kafka key is fine; any other key must equal the model name (``key_mismatch``).
- ``forget_class`` instances without a label get the class as their label (the contract lists
  "examples of that class"); a ``forget`` / ``relabel`` instance without a label gets ``None``, and
  the daemon uses the model's prediction at intake. A ref's dataset label is never used.
- ``NaN`` / ``Infinity`` (not JSON) and nesting too deep for the parser are ``not_json``; a top-level
  ``request_id`` such a document still shows plainly is read tolerantly (:mod:`daemon.pipeline.salvage`), so
  it gets its ``rejected`` receipt.

A rejection's ``detail`` names the field path (``instances[3].label``) and never holds raw input
data or an instance id in clear. Its ``request_id`` is set once it has been read and is valid, its
``model`` once it names a model this intake knows, and its ``kind`` once it is a valid kind.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from daemon.keys import SecretKey
from daemon.data.inline import InlineDataError, decode_inline
from daemon.data.sources import RefError, resolve_refs
from daemon.engine.kinds import GOALS, KINDS, Kind
from daemon.pipeline.codec_checks import (
    MAX_INSTANCE_ID_LENGTH,
    CheckedInstance,
    CheckFailed,
    check_class_field,
    check_instance,
    clip,
    fail,
    json_type,
    kinds_where,
    quote,
    quote_bytes,
)
from daemon.pipeline.canonical import canonical_json
from daemon.pipeline.model_spec import ModelSpec
from daemon.pipeline.receipts import RECEIPT_SCHEMA
from daemon.pipeline.salvage import salvage_fields

__all__ = [
    "MAX_INSTANCE_ID_LENGTH",
    "MAX_SUBMITTED_AT_LENGTH",
    "REASONS",
    "RECEIPT_SCHEMA",
    "GOALS",
    "REQUEST_SCHEMA",
    "CheckedInstance",
    "CheckedRequest",
    "DecodedInstance",
    "DecodedRequest",
    "Limits",
    "ModelSpec",
    "Rejection",
    "canonical_json",
    "check_request",
    "decode_inputs",
    "decode_request",
    "encode_receipt",
]

REQUEST_SCHEMA = "unlearn.request/v1"
MAX_SUBMITTED_AT_LENGTH = 64

#: Every reason a :class:`Rejection` can carry, in check order (for metric labels and docs).
REASONS: tuple[str, ...] = (
    "too_large",
    "empty",
    "not_utf8",
    "not_json",
    "not_object",
    "bad_request_id",
    "duplicate_key",
    "bad_schema",
    "missing_field",
    "bad_type",
    "unknown_model",
    "key_mismatch",
    "bad_kind",
    "class_out_of_range",
    "bad_goal",
    "unexpected_field",
    "no_instances",
    "too_many_instances",
    "bad_instance_id",
    "duplicate_instance",
    "both_ref_and_data",
    "no_input",
    "label_out_of_range",
    "missing_target",
    "target_out_of_range",
    "target_equals_label",
    "label_not_class",
    # from daemon.data.sources.RefError
    "malformed_ref",
    "unknown_ref_source",
    "ref_out_of_range",
    "ref_outside_source",
    "ref_not_found",
    # from daemon.data.inline.InlineDataError
    "bad_format",
    "bad_base64",
    "bad_image",
    "wrong_shape",
    "bad_values",
)

# Field names a detail may quote when an object repeats them (other keys are the sender's text).
_KNOWN_KEYS = frozenset(
    {"schema", "request_id", "model", "kind", "class", "goal", "instances", "submitted_at"}
    | {"id", "ref", "data", "label", "target", "format", "b64"}
)
_OBJECT_REPR = re.compile(r"<[^<>]{1,80} at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Limits:
    """Intake limits (contract §2: 256 instances and 1 MiB a message by default)."""

    max_instances: int = 256
    max_message_bytes: int = 1 << 20
    max_request_id_length: int = 128

    def __post_init__(self) -> None:
        for name in ("max_instances", "max_message_bytes", "max_request_id_length"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Rejection(Exception):
    """A message that is not a valid request; it goes to the DLQ and gets a ``rejected`` receipt.

    ``reason`` is one of :data:`REASONS`; ``detail`` is a sentence naming the field at fault.
    ``request_id`` / ``model`` / ``kind`` are set when they could be read and are valid, else
    ``None``. Never retriable: the same bytes are rejected the same way every time.
    """

    retriable = False

    def __init__(
        self,
        reason: str,
        detail: str,
        request_id: str | None = None,
        model: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.request_id = request_id
        self.model = model
        self.kind = kind


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose structure is valid; :func:`decode_inputs` turns it into a DecodedRequest."""

    request_id: str
    model: str
    kind: str
    instances: tuple[CheckedInstance, ...]
    forget_class: int | None
    submitted_at: str | None
    spec: ModelSpec = field(repr=False, compare=False)
    goal: str | None = None         # None: the model's default (``[[models]] goal``)


@dataclass
class DecodedInstance:
    """One instance ready for a round; ``x`` is ``C×H×W`` float32 in [0, 1].

    ``label`` ``None``: the daemon uses the model's prediction at intake. ``target``: relabel only.
    ``ref``: the ref string when the input came by ref, else ``None``. The clear id is never kept;
    ``plain_id`` (in memory only) is its plain SHA-256 when ``id_sha256`` is keyed (pre-schema-3 ledger rows).
    """

    id_sha256: str
    x: torch.Tensor = field(repr=False)  # a logged request never shows its input
    label: int | None
    target: int | None
    ref: str | None
    plain_id: str | None = field(default=None, repr=False)


@dataclass
class DecodedRequest:
    """A valid ``unlearn.request/v1`` with every input decoded."""

    request_id: str
    model: str
    kind: str
    instances: list[DecodedInstance]
    forget_class: int | None
    submitted_at: str | None
    goal: str | None = None         # None: the model's default (``[[models]] goal``)


def decode_request(
    value: bytes | None,
    key: bytes | None,
    models: Mapping[str, ModelSpec],
    limits: Limits = Limits(),  # noqa: B008 - frozen, so one shared default is safe
) -> DecodedRequest:
    """Decode and validate one request message; raise :class:`Rejection` naming the first fault."""
    return decode_inputs(check_request(value, key, models, limits))


def check_request(
    value: bytes | None,
    key: bytes | None,
    models: Mapping[str, ModelSpec],
    limits: Limits = Limits(),  # noqa: B008 - frozen, so one shared default is safe
    *,
    id_key: SecretKey | None = None,
) -> CheckedRequest:
    """Validate everything but the pixels (cheap); raise :class:`Rejection` on the first fault.

    ``id_key``: the daemon's id key; instance ids are kept as its HMAC (``codec_checks.id_digest``)."""
    ctx = _Context()
    try:
        return _check(value, key, models, limits, ctx, id_key)
    except CheckFailed as fail:
        if fail.reason == "not_json" and ctx.request_id is None:
            _salvage(value, models, limits, ctx)
        raise Rejection(
            fail.reason, fail.detail, request_id=ctx.request_id, model=ctx.model, kind=ctx.kind
        ) from fail.__cause__


_SALVAGED = frozenset({"request_id", "model", "kind"})


def _salvage(value: bytes | None, models: Mapping[str, ModelSpec], limits: Limits, ctx: _Context) -> None:
    """A document the strict reader refused (NaN, a huge integer, a BOM, deep nesting) may still name its request
    plainly: read its top-level request_id (and model, kind) tolerantly, so it gets its ``rejected`` receipt
    (contract §2). Each is kept only if it would pass the strict checks."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return
    fields = salvage_fields(bytes(value).decode("utf-8"), _SALVAGED)     # UTF-8: the not_utf8 check came first
    rid = fields.get("request_id")
    if rid is None or not 1 <= len(rid) <= limits.max_request_id_length or not rid.isprintable():
        return
    ctx.request_id = rid
    if fields.get("model") in models:
        ctx.model = fields["model"]
        if fields.get("kind") in KINDS:
            ctx.kind = fields["kind"]


def decode_inputs(checked: CheckedRequest) -> DecodedRequest:
    """Decode the inline images and gather the referenced ones of a checked request.

    Raises :class:`Rejection` with an inline-data reason (``bad_base64``, ``bad_format``,
    ``bad_image``, ``wrong_shape``, ``bad_values``) naming the first instance that fails.
    """
    spec = checked.spec
    xs: dict[int, torch.Tensor] = {}  # every instance has a ref or data (check_request)
    by_ref = [(i, inst.ref) for i, inst in enumerate(checked.instances) if inst.ref is not None]
    try:
        for i, inst in enumerate(checked.instances):
            if inst.data is not None:
                try:
                    xs[i] = decode_inline(inst.data, spec.input_shape)
                except InlineDataError as exc:
                    text = _OBJECT_REPR.sub("the data", str(exc))  # Pillow names its buffer
                    raise CheckFailed(exc.reason, clip(f"instances[{i}].data: {text}")) from exc
        if by_ref:
            try:
                gathered, _ = resolve_refs([ref for _, ref in by_ref], spec.sources, spec.input_shape)
            except RefError as exc:  # a file's pixels (bad_image, wrong_shape, bad_values), or a file gone
                at = next(i for i, ref in by_ref if ref == exc.ref) if exc.ref else by_ref[0][0]
                raise CheckFailed(exc.reason, clip(f"instances[{at}].ref: {exc.fault or exc.reason}")) from exc
            gathered = gathered.to(torch.float32)
            for row, (i, _) in enumerate(by_ref):
                xs[i] = gathered[row]
    except CheckFailed as fail:
        raise Rejection(
            fail.reason,
            fail.detail,
            request_id=checked.request_id,
            model=checked.model,
            kind=checked.kind,
        ) from fail.__cause__
    instances = [
        DecodedInstance(inst.id_sha256, xs[i], inst.label, inst.target, inst.ref, inst.plain_id)
        for i, inst in enumerate(checked.instances)
    ]
    return DecodedRequest(
        request_id=checked.request_id,
        model=checked.model,
        kind=checked.kind,
        instances=instances,
        forget_class=checked.forget_class,
        submitted_at=checked.submitted_at,
        goal=checked.goal,
    )


def encode_receipt(receipt: Mapping[str, Any]) -> bytes:
    """A receipt (contract §3) as canonical JSON bytes, the ``unlearn.receipts`` message value."""
    if not isinstance(receipt, Mapping):
        raise TypeError(f"a receipt is a mapping, got {type(receipt).__name__}")
    if receipt.get("schema") != RECEIPT_SCHEMA:
        raise ValueError(
            f"a receipt must carry schema {RECEIPT_SCHEMA!r}, got {receipt.get('schema')!r}"
        )
    return canonical_json(dict(receipt))


# --- the checks -------------------------------------------------------------------------------


class _Context:
    __slots__ = ("kind", "model", "request_id")

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.model: str | None = None
        self.kind: str | None = None


def _refuse_constant(name: str) -> NoReturn:
    raise CheckFailed("not_json", f"the message is not JSON: {name} is not a JSON value")


_parsing = threading.local()  # the repeated keys of the document being parsed (one parse per thread at a time)


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: only then look for which key repeats
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                _parsing.repeated.append(name)
            seen.add(name)
    return obj


# one decoder for every message (json.loads with hooks would build a new one per call)
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs_to_dict, parse_constant=_refuse_constant)


def _parse(value: bytes | None, limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """The raw bytes, then the JSON: the document, and the keys it repeats within one object."""
    if value is not None:
        if isinstance(value, memoryview):
            value = value.tobytes()
        elif not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"a message value is bytes or None, got {type(value).__name__}")
        if len(value) > limits.max_message_bytes:
            fail(
                "too_large",
                f"the message is {len(value)} bytes, the limit is {limits.max_message_bytes}",
            )
    if not value:
        fail("empty", "the message value is empty (a tombstone or an empty record)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail("not_utf8", f"the message is not UTF-8: invalid byte at offset {exc.start}")

    repeated: list[str] = []
    _parsing.repeated = repeated
    try:
        if text.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        doc = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        fail("not_json", f"the message is not JSON: {exc.msg} ({where})")
    except RecursionError:
        fail("not_json", "the message is not JSON this reader accepts: nested too deeply")
    except ValueError:  # an integer literal past Python's digit limit (sys.get_int_max_str_digits)
        fail("not_json", "the message is not JSON this reader accepts: an integer is too long")
    if not isinstance(doc, dict):
        fail("not_object", f"the message must be a JSON object, got {json_type(doc)}")
    return doc, repeated


def _check(
    value: bytes | None,
    key: bytes | None,
    models: Mapping[str, ModelSpec],
    limits: Limits,
    ctx: _Context,
    id_key: SecretKey | None = None,
) -> CheckedRequest:
    doc, repeated = _parse(value, limits)

    # request_id first, so that every later rejection can carry it.
    request_id = doc.get("request_id")
    if request_id is None:
        fail("bad_request_id", "request_id is missing")
    if not isinstance(request_id, str):
        fail("bad_request_id", f"request_id must be a string, got {json_type(request_id)}")
    if not 1 <= len(request_id) <= limits.max_request_id_length:
        fail(
            "bad_request_id",
            f"request_id must be 1 to {limits.max_request_id_length} characters, "
            f"got {len(request_id)}",
        )
    if not request_id.isprintable():
        fail("bad_request_id", "request_id must be printable characters only")
    if "request_id" not in repeated:
        ctx.request_id = request_id
    if repeated:
        names = sorted({k for k in repeated if k in _KNOWN_KEYS})
        which = f"key(s) {', '.join(names)}" if names else "a key"
        fail("duplicate_key", f"the message repeats {which} within one object")

    schema = doc.get("schema")
    if schema != REQUEST_SCHEMA:
        got = "it is missing" if schema is None else f"got {quote(schema)}"
        fail("bad_schema", f"schema must be {REQUEST_SCHEMA!r}, {got}")

    model = doc.get("model")
    if model is None:
        fail("missing_field", "model is missing")
    if not isinstance(model, str):
        fail("bad_type", f"model must be a string, got {json_type(model)}")
    spec = models.get(model)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        fail("unknown_model", f"model {quote(model)} is not served here (known: {known})")
    ctx.model = model
    if key and bytes(key) != model.encode("utf-8"):
        fail("key_mismatch", f"the Kafka key {quote_bytes(key)} differs from model {model!r}")

    name = doc.get("kind")
    kind = KINDS.get(name) if isinstance(name, str) else None  # a list or dict is unhashable
    if kind is None:
        got = "it is missing" if name is None else f"got {quote(name)}"
        fail("bad_kind", f"kind must be one of {', '.join(KINDS)}, {got}")
    ctx.kind = name
    forget_class = _check_class(doc.get("class"), kind, spec.num_classes)
    goal = _check_goal(doc.get("goal"), kind)

    submitted_at = doc.get("submitted_at")
    if submitted_at is not None and (
        not isinstance(submitted_at, str) or len(submitted_at) > MAX_SUBMITTED_AT_LENGTH
    ):
        got = (
            f"{len(submitted_at)} characters"
            if isinstance(submitted_at, str)
            else json_type(submitted_at)
        )
        fail(
            "bad_type",
            f"submitted_at must be a string of at most {MAX_SUBMITTED_AT_LENGTH} characters "
            f"(an RFC 3339 time), got {got}",
        )

    items = doc.get("instances")
    if items is None:
        fail("missing_field", "instances is missing")
    if not isinstance(items, list):
        fail("bad_type", f"instances must be a list, got {json_type(items)}")
    if not items:
        fail("no_instances", "instances is empty: a request names at least one instance")
    if len(items) > limits.max_instances:
        fail(
            "too_many_instances",
            f"instances has {len(items)} entries, the limit is {limits.max_instances}",
        )

    first_index: dict[str, int] = {}
    checked = [
        check_instance(i, item, kind, forget_class, spec, first_index, id_key)
        for i, item in enumerate(items)
    ]
    return CheckedRequest(
        request_id=request_id,
        model=model,
        kind=name,
        instances=tuple(checked),
        forget_class=forget_class,
        submitted_at=submitted_at,
        spec=spec,
        goal=goal,
    )


def _check_class(forget_class: object, kind: Kind, num_classes: int) -> int | None:
    """The request's ``class``: required of a kind that names one, unexpected on any other."""
    if kind.names_class:
        if forget_class is None:
            fail("missing_field", f"class is missing: {kind.name} needs the class to forget")
        return check_class_field(forget_class, "class", "class_out_of_range", num_classes)
    if forget_class is not None:
        only = kinds_where(lambda k: k.names_class)
        fail("unexpected_field", f"class is only for kind {only}, not {kind.name}")
    return None


def _check_goal(goal: object, kind: Kind) -> str | None:
    """The request's ``goal`` (absent: the model's default). Only ``forget`` has a choice: the other kinds' goal
    is their own (a target reached, a class gone), so ``unseen`` there is refused rather than ignored."""
    if goal is None:
        return None
    if not isinstance(goal, str) or goal not in GOALS:
        fail("bad_goal", f"goal must be one of {', '.join(GOALS)}, got {quote(goal)}")
    if goal != "misclassify" and not kind.chooses_goal:
        only = kinds_where(lambda k: k.chooses_goal)
        fail("bad_goal", f"goal {goal} is only for kind {only}, not {kind.name}")
    return goal

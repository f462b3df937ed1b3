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
it), ``duplicate_key``, ``schema``, ``model``, the Kafka key, ``kind``, ``class``,
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
- ``NaN`` / ``Infinity`` (not JSON) and nesting too deep for the parser are ``not_json``.

A rejection's ``detail`` names the field path (``instances[3].label``) and never holds raw input
data or an instance id in clear. Its ``request_id`` is set once it has been read and is valid, its
``model`` once it names a model this intake knows, and its ``kind`` once it is a valid kind.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NoReturn

import torch

from daemon.data.inline import INLINE_FORMATS, InlineDataError, decode_inline
from daemon.data.sources import RefError, Source, parse_ref, resolve_refs
from daemon.engine.requests import KINDS
from daemon.service.receipts import RECEIPT_SCHEMA

__all__ = [
    "MAX_INSTANCE_ID_LENGTH",
    "MAX_SUBMITTED_AT_LENGTH",
    "REASONS",
    "RECEIPT_SCHEMA",
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
MAX_INSTANCE_ID_LENGTH = 512
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
    # from daemon.data.inline.InlineDataError
    "bad_format",
    "bad_base64",
    "bad_image",
    "wrong_shape",
    "bad_values",
)

# Field names a detail may quote when an object repeats them (other keys are the sender's text).
_KNOWN_KEYS = frozenset(
    {"schema", "request_id", "model", "kind", "class", "instances", "submitted_at"}
    | {"id", "ref", "data", "label", "target", "format", "b64"}
)
_DATA_KEYS = frozenset({"format", "b64"})
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


@dataclass(frozen=True)
class ModelSpec:
    """What intake knows about one live model: its input, its classes and its ref sources.

    ``sources`` maps a source name (``"mnist-train"``) to ``(images N×C×H×W float in [0, 1],
    labels N)``; it is copied into a read-only mapping. Every source must match ``input_shape``.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    sources: Mapping[str, Source] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a model name must be a non-empty string, got {self.name!r}")
        shape = tuple(self.input_shape) if isinstance(self.input_shape, (tuple, list)) else None
        if shape is None or len(shape) != 3 or not all(type(d) is int and d > 0 for d in shape):
            raise ValueError(
                f"model {self.name!r}: input_shape must be (C, H, W) of positive integers, "
                f"got {self.input_shape!r}"
            )
        if type(self.num_classes) is not int or self.num_classes < 1:
            raise ValueError(
                f"model {self.name!r}: num_classes must be a positive integer, "
                f"got {self.num_classes!r}"
            )
        if not isinstance(self.sources, Mapping):
            raise ValueError(
                f"model {self.name!r}: sources must be a mapping of name to (images, labels)"
            )
        for source, pair in self.sources.items():
            _check_source(self.name, source, pair, shape)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))


def _check_source(model: str, source: object, pair: object, shape: tuple[int, ...]) -> None:
    where = f"model {model!r}, source {source!r}"
    try:
        named = parse_ref(f"{source}:0")[0] if isinstance(source, str) else None
    except RefError:
        named = None
    if named != source:
        raise ValueError(
            f"{where}: a source name is letters, digits, '.', '_' and '-' (refs could not name it)"
        )
    if not isinstance(pair, tuple) or len(pair) != 2:
        raise ValueError(f"{where}: a source is a pair (images, labels)")
    x, y = pair
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: images must be N×{'×'.join(map(str, shape))}, got {got}")
    if not torch.is_floating_point(x):
        raise ValueError(f"{where}: images must be floating point in [0, 1], got {x.dtype}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0],):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{where}: need one label per image ({x.shape[0]}), got {got}")


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
class CheckedInstance:
    """One instance after :func:`check_request`: validated, its input not decoded yet."""

    id_sha256: str
    label: int | None
    target: int | None
    ref: str | None
    data: Mapping[str, Any] | None = field(default=None, repr=False)


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


@dataclass
class DecodedInstance:
    """One instance ready for a round; ``x`` is ``C×H×W`` float32 in [0, 1].

    ``label`` ``None``: the daemon uses the model's prediction at intake. ``target``: relabel only.
    ``ref``: the ref string when the input came by ref, else ``None``. The clear id is never kept.
    """

    id_sha256: str
    x: torch.Tensor = field(repr=False)  # a logged request never shows its input
    label: int | None
    target: int | None
    ref: str | None


@dataclass
class DecodedRequest:
    """A valid ``unlearn.request/v1`` with every input decoded."""

    request_id: str
    model: str
    kind: str
    instances: list[DecodedInstance]
    forget_class: int | None
    submitted_at: str | None


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
) -> CheckedRequest:
    """Validate everything but the pixels (cheap); raise :class:`Rejection` on the first fault."""
    ctx = _Context()
    try:
        return _check(value, key, models, limits, ctx)
    except _Fail as fail:
        raise Rejection(
            fail.reason, fail.detail, request_id=ctx.request_id, model=ctx.model, kind=ctx.kind
        ) from fail.__cause__


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
                    raise _Fail(exc.reason, _clip(f"instances[{i}].data: {text}")) from exc
        if by_ref:
            try:
                gathered, _ = resolve_refs([ref for _, ref in by_ref], spec.sources)
            except RefError as exc:  # check_request has seen every ref: only if sources changed
                at = next(i for i, ref in by_ref if ref == exc.ref) if exc.ref else by_ref[0][0]
                raise _Fail(exc.reason, f"instances[{at}].ref: {exc.reason}") from exc
            gathered = gathered.to(torch.float32)
            for row, (i, _) in enumerate(by_ref):
                xs[i] = gathered[row]
    except _Fail as fail:
        raise Rejection(
            fail.reason,
            fail.detail,
            request_id=checked.request_id,
            model=checked.model,
            kind=checked.kind,
        ) from fail.__cause__
    instances = [
        DecodedInstance(inst.id_sha256, xs[i], inst.label, inst.target, inst.ref)
        for i, inst in enumerate(checked.instances)
    ]
    return DecodedRequest(
        request_id=checked.request_id,
        model=checked.model,
        kind=checked.kind,
        instances=instances,
        forget_class=checked.forget_class,
        submitted_at=checked.submitted_at,
    )


def canonical_json(obj: Any) -> bytes:
    """Compact JSON with sorted keys, UTF-8, no NaN/Infinity: the same bytes for the same value.

    Used for receipts and for hashing (the audit chain). Raises ``ValueError`` for NaN/Infinity
    or text that is not valid Unicode, ``TypeError`` for values JSON does not have.
    """
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


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


class _Fail(Exception):
    """Internal: a rejection before its context (request_id, model, kind) is attached."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class _Context:
    __slots__ = ("kind", "model", "request_id")

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.model: str | None = None
        self.kind: str | None = None


def _fail(reason: str, detail: str) -> NoReturn:
    raise _Fail(reason, detail)


def _refuse_constant(name: str) -> NoReturn:
    raise _Fail("not_json", f"the message is not JSON: {name} is not a JSON value")


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


def _check(
    value: bytes | None,
    key: bytes | None,
    models: Mapping[str, ModelSpec],
    limits: Limits,
    ctx: _Context,
) -> CheckedRequest:
    # The raw bytes, before any parsing.
    if value is not None:
        if isinstance(value, memoryview):
            value = value.tobytes()
        elif not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"a message value is bytes or None, got {type(value).__name__}")
        if len(value) > limits.max_message_bytes:
            _fail(
                "too_large",
                f"the message is {len(value)} bytes, the limit is {limits.max_message_bytes}",
            )
    if not value:
        _fail("empty", "the message value is empty (a tombstone or an empty record)")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail("not_utf8", f"the message is not UTF-8: invalid byte at offset {exc.start}")

    repeated: list[str] = []
    _parsing.repeated = repeated
    try:
        if text.startswith("\ufeff"):  # as json.loads does
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        doc = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        _fail("not_json", f"the message is not JSON: {exc.msg} ({where})")
    except RecursionError:
        _fail("not_json", "the message is not JSON this reader accepts: nested too deeply")
    except ValueError:  # an integer literal past Python's digit limit (sys.get_int_max_str_digits)
        _fail("not_json", "the message is not JSON this reader accepts: an integer is too long")
    if not isinstance(doc, dict):
        _fail("not_object", f"the message must be a JSON object, got {_json_type(doc)}")

    # request_id first, so that every later rejection can carry it.
    request_id = doc.get("request_id")
    if request_id is None:
        _fail("bad_request_id", "request_id is missing")
    if not isinstance(request_id, str):
        _fail("bad_request_id", f"request_id must be a string, got {_json_type(request_id)}")
    if not 1 <= len(request_id) <= limits.max_request_id_length:
        _fail(
            "bad_request_id",
            f"request_id must be 1 to {limits.max_request_id_length} characters, "
            f"got {len(request_id)}",
        )
    if not request_id.isprintable():
        _fail("bad_request_id", "request_id must be printable characters only")
    if "request_id" not in repeated:
        ctx.request_id = request_id
    if repeated:
        names = sorted({k for k in repeated if k in _KNOWN_KEYS})
        which = f"key(s) {', '.join(names)}" if names else "a key"
        _fail("duplicate_key", f"the message repeats {which} within one object")

    schema = doc.get("schema")
    if schema != REQUEST_SCHEMA:
        got = "it is missing" if schema is None else f"got {_quote(schema)}"
        _fail("bad_schema", f"schema must be {REQUEST_SCHEMA!r}, {got}")

    model = doc.get("model")
    if model is None:
        _fail("missing_field", "model is missing")
    if not isinstance(model, str):
        _fail("bad_type", f"model must be a string, got {_json_type(model)}")
    spec = models.get(model)
    if spec is None:
        known = ", ".join(sorted(models)) or "none"
        _fail("unknown_model", f"model {_quote(model)} is not served here (known: {known})")
    ctx.model = model
    if key and bytes(key) != model.encode("utf-8"):
        _fail("key_mismatch", f"the Kafka key {_quote_bytes(key)} differs from model {model!r}")

    kind = doc.get("kind")
    if kind not in KINDS:  # hashing a list or dict would raise: compare against the tuple
        got = "it is missing" if kind is None else f"got {_quote(kind)}"
        _fail("bad_kind", f"kind must be one of {', '.join(KINDS)}, {got}")
    ctx.kind = kind
    num_classes = spec.num_classes

    forget_class = doc.get("class")
    if kind == "forget_class":
        if forget_class is None:
            _fail("missing_field", "class is missing: forget_class needs the class to forget")
        if type(forget_class) is not int:
            _fail("bad_type", f"class must be an integer, got {_json_type(forget_class)}")
        if not 0 <= forget_class < num_classes:
            _fail(
                "class_out_of_range",
                f"class must lie in [0, {num_classes - 1}], got {forget_class}",
            )
    elif forget_class is not None:
        _fail("unexpected_field", f"class is only for kind forget_class, not {kind}")

    submitted_at = doc.get("submitted_at")
    if submitted_at is not None and (
        not isinstance(submitted_at, str) or len(submitted_at) > MAX_SUBMITTED_AT_LENGTH
    ):
        got = (
            f"{len(submitted_at)} characters"
            if isinstance(submitted_at, str)
            else _json_type(submitted_at)
        )
        _fail(
            "bad_type",
            f"submitted_at must be a string of at most {MAX_SUBMITTED_AT_LENGTH} characters "
            f"(an RFC 3339 time), got {got}",
        )

    items = doc.get("instances")
    if items is None:
        _fail("missing_field", "instances is missing")
    if not isinstance(items, list):
        _fail("bad_type", f"instances must be a list, got {_json_type(items)}")
    if not items:
        _fail("no_instances", "instances is empty: a request names at least one instance")
    if len(items) > limits.max_instances:
        _fail(
            "too_many_instances",
            f"instances has {len(items)} entries, the limit is {limits.max_instances}",
        )

    first_index: dict[str, int] = {}
    checked = [
        _check_instance(i, item, kind, forget_class, spec, first_index)
        for i, item in enumerate(items)
    ]
    return CheckedRequest(
        request_id=request_id,
        model=model,
        kind=kind,
        instances=tuple(checked),
        forget_class=forget_class,
        submitted_at=submitted_at,
        spec=spec,
    )


def _check_instance(
    i: int,
    item: object,
    kind: str,
    forget_class: int | None,
    spec: ModelSpec,
    first_index: dict[str, int],
) -> CheckedInstance:
    if not isinstance(item, dict):
        _fail("bad_type", f"instances[{i}] must be an object, got {_json_type(item)}")

    instance_id = item.get("id")
    if instance_id is None:
        _fail("missing_field", f"instances[{i}].id is missing")
    if not isinstance(instance_id, str):
        _fail("bad_type", f"instances[{i}].id must be a string, got {_json_type(instance_id)}")
    if not 1 <= len(instance_id) <= MAX_INSTANCE_ID_LENGTH:
        _fail(
            "bad_instance_id",
            f"instances[{i}].id must be 1 to {MAX_INSTANCE_ID_LENGTH} characters, "
            f"got {len(instance_id)}",
        )
    try:
        id_sha256 = hashlib.sha256(instance_id.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:  # a lone surrogate from a \ud8xx escape
        _fail("bad_instance_id", f"instances[{i}].id is not valid Unicode (a lone surrogate)")
    earlier = first_index.setdefault(instance_id, i)
    if earlier != i:
        _fail("duplicate_instance", f"instances[{i}].id repeats instances[{earlier}].id")

    ref = item.get("ref")
    data = item.get("data")
    if ref is not None and data is not None:
        _fail("both_ref_and_data", f"instances[{i}] has both ref and data: give exactly one")
    if ref is None and data is None:
        _fail("no_input", f"instances[{i}] has neither ref nor data: give exactly one")

    num_classes = spec.num_classes
    label = item.get("label")
    if label is not None:
        if type(label) is not int:
            _fail("bad_type", f"instances[{i}].label must be an integer, got {_json_type(label)}")
        if not 0 <= label < num_classes:
            _fail(
                "label_out_of_range",
                f"instances[{i}].label must lie in [0, {num_classes - 1}], got {label}",
            )

    target = item.get("target")
    if kind == "relabel":
        if target is None:
            _fail("missing_target", f"instances[{i}].target is missing: relabel needs one")
        if type(target) is not int:
            _fail("bad_type", f"instances[{i}].target must be an integer, got {_json_type(target)}")
        if not 0 <= target < num_classes:
            _fail(
                "target_out_of_range",
                f"instances[{i}].target must lie in [0, {num_classes - 1}], got {target}",
            )
        if target == label:
            _fail("target_equals_label", f"instances[{i}].target equals its label ({label})")
    elif target is not None:
        _fail("unexpected_field", f"instances[{i}].target is only for kind relabel, not {kind}")

    if kind == "forget_class":
        if label is None:
            label = forget_class
        elif label != forget_class:
            _fail(
                "label_not_class",
                f"instances[{i}].label is {label}, but the request forgets class {forget_class}",
            )

    if ref is not None:
        _check_ref(i, ref, spec)
        return CheckedInstance(id_sha256, label, target, ref, None)
    _check_data_object(i, data)
    return CheckedInstance(id_sha256, label, target, None, data)


def _check_ref(i: int, ref: object, spec: ModelSpec) -> None:
    try:
        source, index = parse_ref(ref)  # type: ignore[arg-type] # parse_ref reports non-strings
    except RefError as exc:
        if exc.reason == "ref_out_of_range":
            _fail(exc.reason, f"instances[{i}].ref: the index must be a non-negative integer")
        _fail(exc.reason, f"instances[{i}].ref must be '<source>:<index>', e.g. 'mnist-train:123'")
    pair = spec.sources.get(source)
    if pair is None:
        known = ", ".join(sorted(spec.sources)) or "none"
        _fail(
            "unknown_ref_source",
            f"instances[{i}].ref names source {_quote(source)}, "
            f"not configured for model {spec.name!r} (known: {known})",
        )
    size = pair[0].shape[0]
    if index >= size:
        _fail(
            "ref_out_of_range",
            f"instances[{i}].ref: index {index} is past the end of {source!r} "
            f"({size} items, 0..{size - 1})",
        )


def _check_data_object(i: int, data: object) -> None:
    """The ``data`` object's shape, with decode_inline's reasons, before any pixel is decoded."""
    if not isinstance(data, dict):
        _fail("bad_format", f"instances[{i}].data must be an object, got {_json_type(data)}")
    if data.keys() != _DATA_KEYS:
        _fail("bad_format", f"instances[{i}].data must have exactly the keys format and b64")
    if data["format"] not in INLINE_FORMATS:
        _fail(
            "bad_format",
            f"instances[{i}].data.format must be one of {', '.join(INLINE_FORMATS)}, "
            f"got {_quote(data['format'])}",
        )
    if not isinstance(data["b64"], str):
        got = _json_type(data["b64"])
        _fail("bad_base64", f"instances[{i}].data.b64 must be a string, got {got}")


# --- details ----------------------------------------------------------------------------------

_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _quote(value: object, limit: int = 64) -> str:
    """A short, printable quote of a sender's name-like string (never used for data or ids)."""
    if not isinstance(value, str):
        return _json_type(value)
    if len(value) > limit or not value.isprintable():
        return f"a {len(value)}-character string"
    return repr(value)


def _quote_bytes(value: bytes | bytearray, limit: int = 64) -> str:
    try:
        return _quote(bytes(value).decode("utf-8"), limit)
    except UnicodeDecodeError:
        return f"a {len(value)}-byte non-UTF-8 key"


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""The codec's per-instance checks, and how a rejection's detail quotes what it saw.

:func:`daemon.pipeline.codec.check_request` checks a message's envelope, then hands each instance to
:func:`check_instance`, in order: object, ``id``, duplicate id, ``ref``/``data``, ``label``,
``target``, the class, the ref, the ``data`` object. What the request's kind requires of an instance
(a ``target``, a label that is the request's class) is read from the kind
(:class:`daemon.engine.kinds.Kind`), never from its name.

A failed check raises :class:`CheckFailed` (``reason``, ``detail``); the codec turns it into a
:class:`~daemon.pipeline.codec.Rejection` with the request's context. A detail names the field path
(``instances[3].label``) and never holds raw input data or an instance id in clear: :func:`quote`
quotes only short printable name-like strings, :func:`json_type` names a value by its JSON type.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from daemon import keys
from daemon.data.inline import INLINE_FORMATS
from daemon.data.sources import RefError, parse_ref
from daemon.engine.kinds import KINDS, Kind
from daemon.pipeline.model_spec import ModelSpec

__all__ = [
    "MAX_INSTANCE_ID_LENGTH",
    "CheckFailed",
    "CheckedInstance",
    "check_class_field",
    "check_instance",
    "clip",
    "fail",
    "id_digest",
    "json_type",
    "kinds_where",
    "quote",
    "quote_bytes",
]

MAX_INSTANCE_ID_LENGTH = 512

_DATA_KEYS = frozenset({"format", "b64"})


class CheckFailed(Exception):
    """A failed check, before the codec attaches the request's context (request_id, model, kind)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def fail(reason: str, detail: str) -> NoReturn:
    """Raise :class:`CheckFailed`: a check's one-line way out."""
    raise CheckFailed(reason, detail)


def id_digest(instance_id: str, id_key: keys.SecretKey | None) -> str:
    """What the daemon keeps of an instance id: its HMAC-SHA256 under the id key (``hmac-sha256:<key id>:<hex>``),
    so a guessable id cannot be confirmed from a receipt; a plain SHA-256 only without a key (tools, tests).
    Raises UnicodeEncodeError for a lone surrogate."""
    data = instance_id.encode("utf-8")
    if id_key is None:
        return hashlib.sha256(data).hexdigest()
    return keys.keyed_digest(id_key, b"unlearnd.id", data)


@dataclass(frozen=True)
class CheckedInstance:
    """One instance after ``check_request``: validated, its input not decoded yet; ``id_sha256`` is the id's
    digest (:func:`id_digest`: keyed when the daemon has an id key), never the id. ``plain_id``: with a key, the
    id's plain SHA-256 too, held in memory only to find instances a ledger recorded before keyed digests."""

    id_sha256: str
    label: int | None
    target: int | None
    ref: str | None
    data: Mapping[str, Any] | None = field(default=None, repr=False)
    plain_id: str | None = field(default=None, repr=False)


def kinds_where(has: Callable[[Kind], bool]) -> str:
    """The wire names of the kinds for which ``has`` holds, for a detail (``"relabel"``)."""
    return " or ".join(name for name, kind in KINDS.items() if has(kind))


def check_instance(
    i: int,
    item: object,
    kind: Kind,
    forget_class: int | None,
    spec: ModelSpec,
    first_index: dict[str, int],
    id_key: keys.SecretKey | None = None,
) -> CheckedInstance:
    """Check ``instances[i]`` of a request of ``kind``.

    ``first_index`` maps every id seen so far to its index (a repeat is ``duplicate_instance``); ``id_key``
    keys the id's digest (:func:`id_digest`).
    """
    if not isinstance(item, dict):
        fail("bad_type", f"instances[{i}] must be an object, got {json_type(item)}")

    instance_id = item.get("id")
    if instance_id is None:
        fail("missing_field", f"instances[{i}].id is missing")
    if not isinstance(instance_id, str):
        fail("bad_type", f"instances[{i}].id must be a string, got {json_type(instance_id)}")
    if not 1 <= len(instance_id) <= MAX_INSTANCE_ID_LENGTH:
        fail(
            "bad_instance_id",
            f"instances[{i}].id must be 1 to {MAX_INSTANCE_ID_LENGTH} characters, "
            f"got {len(instance_id)}",
        )
    try:
        id_sha256 = id_digest(instance_id, id_key)
        plain_id = None if id_key is None else id_digest(instance_id, None)
    except UnicodeEncodeError:  # a lone surrogate from a \ud8xx escape
        fail("bad_instance_id", f"instances[{i}].id is not valid Unicode (a lone surrogate)")
    earlier = first_index.setdefault(instance_id, i)
    if earlier != i:
        fail("duplicate_instance", f"instances[{i}].id repeats instances[{earlier}].id")

    ref = item.get("ref")
    data = item.get("data")
    if ref is not None and data is not None:
        fail("both_ref_and_data", f"instances[{i}] has both ref and data: give exactly one")
    if ref is None and data is None:
        fail("no_input", f"instances[{i}] has neither ref nor data: give exactly one")

    label = item.get("label")
    if label is not None:
        check_class_field(label, f"instances[{i}].label", "label_out_of_range", spec.num_classes)

    target = item.get("target")
    if kind.names_targets:
        if target is None:
            fail("missing_target", f"instances[{i}].target is missing: {kind.name} needs one")
        check_class_field(target, f"instances[{i}].target", "target_out_of_range", spec.num_classes)
        if target == label:
            fail("target_equals_label", f"instances[{i}].target equals its label ({label})")
    elif target is not None:
        only = kinds_where(lambda k: k.names_targets)
        fail("unexpected_field", f"instances[{i}].target is only for kind {only}, not {kind.name}")

    if kind.names_class:  # every instance is an example of the class: that is its label
        if label is None:
            label = forget_class
        elif label != forget_class:
            fail(
                "label_not_class",
                f"instances[{i}].label is {label}, but the request forgets class {forget_class}",
            )

    if ref is not None:
        _check_ref(i, ref, spec)
        return CheckedInstance(id_sha256, label, target, ref, None, plain_id)
    _check_data_object(i, data)
    return CheckedInstance(id_sha256, label, target, None, data, plain_id)


def check_class_field(value: object, where: str, out_of_range: str, num_classes: int) -> int:
    """A field that holds a class (``where`` names it): an integer, else ``bad_type``, in
    [0, num_classes), else the reason ``out_of_range``."""
    if type(value) is not int:
        fail("bad_type", f"{where} must be an integer, got {json_type(value)}")
    if not 0 <= value < num_classes:
        fail(out_of_range, f"{where} must lie in [0, {num_classes - 1}], got {value}")
    return value


def _check_ref(i: int, ref: object, spec: ModelSpec) -> None:
    """A ref's form, source, range, and for a path its place in the source's listing (no pixels read)."""
    try:
        source, where = parse_ref(ref)  # type: ignore[arg-type] # parse_ref reports non-strings
    except RefError as exc:
        if exc.reason == "ref_out_of_range":
            fail(exc.reason, f"instances[{i}].ref: the index must be a non-negative integer")
        if exc.reason == "ref_outside_source":
            fail(exc.reason, f"instances[{i}].ref: a path is relative to the source's root, "
                             "without empty, '.' or '..' parts")
        fail(exc.reason, f"instances[{i}].ref must be '<source>:<index>' or '<source>:<dir>/<file>', "
                         "e.g. 'mnist-train:123'")
    found = spec.sources.get(source)
    if found is None:
        known = ", ".join(sorted(spec.sources)) or "none"
        fail(
            "unknown_ref_source",
            f"instances[{i}].ref names source {quote(source)}, "
            f"not configured for model {spec.name!r} (known: {known})",
        )
    if isinstance(where, str):
        try:
            found.index_of(where)
        except RefError as exc:  # ref_not_found, ref_outside_source, or a source without paths
            fail(exc.reason, f"instances[{i}].ref: {_PATH_FAULTS.get(exc.reason, exc.reason)} "
                             f"(source {source!r})")
        return
    size = len(found)
    if where >= size:
        fail(
            "ref_out_of_range",
            f"instances[{i}].ref: index {where} is past the end of {source!r} "
            f"({size} items, 0..{size - 1})",
        )


#: a path ref's fault in a detail (the path itself is the sender's and is not quoted)
_PATH_FAULTS = {
    "ref_not_found": "no such item: the path is not in the source's listing",
    "ref_outside_source": "the path leads out of the source's root",
    "malformed_ref": "this source has no paths: name its items by index",
}


def _check_data_object(i: int, data: object) -> None:
    """The ``data`` object's shape, with decode_inline's reasons, before any pixel is decoded."""
    if not isinstance(data, dict):
        fail("bad_format", f"instances[{i}].data must be an object, got {json_type(data)}")
    if data.keys() != _DATA_KEYS:
        fail("bad_format", f"instances[{i}].data must have exactly the keys format and b64")
    if data["format"] not in INLINE_FORMATS:
        fail(
            "bad_format",
            f"instances[{i}].data.format must be one of {', '.join(INLINE_FORMATS)}, "
            f"got {quote(data['format'])}",
        )
    if not isinstance(data["b64"], str):
        got = json_type(data["b64"])
        fail("bad_base64", f"instances[{i}].data.b64 must be a string, got {got}")


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


def json_type(value: object) -> str:
    """The JSON type of ``value`` with its article (``"a list"``), for a detail."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def quote(value: object, limit: int = 64) -> str:
    """A short, printable quote of a sender's name-like string (never used for data or ids)."""
    if not isinstance(value, str):
        return json_type(value)
    if len(value) > limit or not value.isprintable():
        return f"a {len(value)}-character string"
    return repr(value)


def quote_bytes(value: bytes | bytearray, limit: int = 64) -> str:
    """:func:`quote` of a Kafka key: its UTF-8 text, or its length when it is not UTF-8."""
    try:
        return quote(bytes(value).decode("utf-8"), limit)
    except UnicodeDecodeError:
        return f"a {len(value)}-byte non-UTF-8 key"


def clip(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"

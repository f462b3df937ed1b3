"""daemon.engine.kinds: every rule over every registered kind, and a stub kind accepted end to end.

Every test here is parametrised over ``KINDS`` and builds its requests and messages from the kind's own
attributes (``names_class``, ``names_targets``, ``towards``, ...), so a new kind runs through all of
them once it is registered; only ``RULES`` (the kind's own validation messages) is written per kind,
and a test fails until the new kind has its entry. ``test_a_stub_kind_*`` registers a tiny kind
(monkeypatch) and shows that codec, intake validation and command line accept it without any other
module changing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
import torch

from daemon.engine.config import UnlearnConfig
from daemon.engine.kinds import KINDS, ForgetClass, Kind, get_kind
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import OUTCOMES
from daemon.errors import UsageError
from daemon.pipeline.codec import CheckedRequest, ModelSpec, Rejection, check_request

NAMES = list(KINDS)
NUM_CLASSES = 4
SHAPE = (1, 2, 2)
CLASS = 2
X = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])
CONFIGS = {
    "zero": UnlearnConfig(),
    "margin": UnlearnConfig(forget_margin=1.0),
    # a level below one instance in four: with four instances, every one must be there here too
    "calibrated": UnlearnConfig(stop="calibrated", stop_level=0.2),
}


def valid_request(kind: Kind) -> ForgetRequest:
    """The smallest valid request of ``kind``, from what it names on the wire."""
    labels = torch.full((4,), CLASS) if kind.names_class else Y
    targets = (labels + 1) % NUM_CLASSES if kind.names_targets else None
    return ForgetRequest(kind.name, X, labels, targets=targets, forget_class=CLASS if kind.names_class else None)


def _validate(request: ForgetRequest) -> None:
    request.validate(num_classes=NUM_CLASSES, input_shape=SHAPE)


#: each kind's own rules, as a change to its valid request and the message that names the fault
RULES: dict[str, list[tuple[dict[str, Any], str]]] = {
    "forget": [
        (dict(targets=(Y + 1) % 4), "targets are only for relabel, not forget"),
        (dict(forget_class=CLASS), "forget_class is only for kind forget_class, not forget"),
    ],
    "relabel": [
        (dict(targets=None), "relabel needs one target per instance"),
        (dict(targets=Y[:2]), "relabel needs one target per instance"),
        (dict(targets=torch.tensor([1, 2, 3, 9])), r"targets must lie in \[0, 3\]"),
        (dict(targets=torch.tensor([1, 2, 3, 3])), "must differ from the instance's label"),
        (dict(forget_class=CLASS), "forget_class is only for kind forget_class, not relabel"),
    ],
    "forget_class": [
        (dict(forget_class=None), r"forget_class needs a class in \[0, 3\], got None"),
        (dict(forget_class=4), r"forget_class needs a class in \[0, 3\], got 4"),
        (dict(labels=Y), "every example of a forget_class request must carry that class"),
        (dict(targets=Y), "targets are only for relabel, not forget_class"),
    ],
}


def test_every_kind_has_its_rules_listed() -> None:
    assert set(RULES) == set(KINDS)


@pytest.mark.parametrize("name", NAMES)
def test_a_kind_is_registered_under_its_wire_name(name: str) -> None:
    kind = get_kind(name)
    assert kind is KINDS[name] and isinstance(kind, Kind) and kind.name == name
    assert kind.success in OUTCOMES


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown kind 'erase'; known: forget, relabel, forget_class"):
        get_kind("erase")
    with pytest.raises(ValueError, match="unknown kind"):
        get_kind(["forget"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", NAMES)
def test_a_valid_request_of_every_kind_validates(name: str) -> None:
    assert _validate(valid_request(get_kind(name))) is None


@pytest.mark.parametrize(("name", "change", "match"),
                         [(name, change, match) for name, rules in RULES.items() for change, match in rules])
def test_a_request_that_breaks_one_of_its_kinds_rules_is_refused(name: str, change: dict, match: str) -> None:
    request = dataclasses.replace(valid_request(get_kind(name)), **change)
    with pytest.raises(ValueError, match=match):
        _validate(request)


# -- the goal: stopping rule and active instances ----------------------------------------------------

def _logits(kind: Kind, request: ForgetRequest, at_goal: torch.Tensor) -> torch.Tensor:
    """Toy logits: the instances in ``at_goal`` where the kind wants them (the target, or another class
    far past any margin), the others still on their label."""
    towards = kind.towards(request)
    away = (request.labels + 1) % NUM_CLASSES
    wanted_class = torch.where(at_goal, towards if towards is not None else away, request.labels)
    return torch.nn.functional.one_hot(wanted_class, NUM_CLASSES).float() * 10.0


def _accuracy(kind: Kind, request: ForgetRequest, logits: torch.Tensor) -> float:
    return float((logits.argmax(1) == kind.wanted(request)).float().mean())


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_the_goal_is_reached_when_every_instance_is_there_and_not_before(name: str, config: UnlearnConfig) -> None:
    kind = get_kind(name)
    request = valid_request(kind)
    towards = kind.towards(request)
    for reached in ([False] * 4, [True, False, False, False], [True, True, True, False]):
        logits = _logits(kind, request, torch.tensor(reached))
        assert not kind.stop_reached(_accuracy(kind, request, logits), config)
        assert kind.still_active(logits, request.labels, towards, config).tolist() == [not r for r in reached]
    logits = _logits(kind, request, torch.ones(4, dtype=torch.bool))
    assert kind.stop_reached(_accuracy(kind, request, logits), config)
    assert not kind.still_active(logits, request.labels, towards, config).any()


@pytest.mark.parametrize("name", NAMES)
def test_an_instance_short_of_its_margin_stays_active_where_the_kind_stops_on_margins(name: str) -> None:
    kind = get_kind(name)
    config = CONFIGS["margin"]
    request = valid_request(kind)
    # every instance just past its label's boundary: misclassified, but by far less than any margin
    logits = torch.nn.functional.one_hot(request.labels, NUM_CLASSES).float()
    logits[torch.arange(4), (request.labels + 1) % NUM_CLASSES] = 1.01
    active = kind.still_active(logits, request.labels, kind.towards(request), config)
    assert bool(active.all()) == (kind.stops_on_margin(config) and kind.forget_margin(config) > 0.01)


# -- labels left out at intake ------------------------------------------------------------------------

class _Predict:
    """Stands in for the published model: answers 3 for every instance asked about, and records the asks."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def __call__(self, indices: list[int]) -> list[int]:
        self.asked.append(list(indices))
        return [3] * len(indices)


@pytest.mark.parametrize("name", NAMES)
def test_fill_labels_fills_exactly_the_missing_labels(name: str) -> None:
    kind = get_kind(name)
    given = CLASS if kind.names_class else 1
    predict = _Predict()
    labels = kind.fill_labels([given, None, given, None], CLASS if kind.names_class else None, predict)
    filler = CLASS if kind.names_class else 3
    assert labels == [given, filler, given, filler] and all(type(v) is int for v in labels)
    # the model is asked about the missing instances only, once, and never by a kind that names the class
    assert predict.asked == ([] if kind.names_class else [[1, 3]])


@pytest.mark.parametrize("name", NAMES)
def test_fill_labels_asks_the_model_nothing_when_every_label_is_given(name: str) -> None:
    kind = get_kind(name)
    predict = _Predict()
    given = [CLASS] * 3 if kind.names_class else [0, 1, 2]
    assert kind.fill_labels(given, CLASS if kind.names_class else None, predict) == given
    assert predict.asked == []


def test_forget_class_fills_in_its_class_not_the_models_prediction() -> None:
    predict = _Predict()
    assert KINDS[ForgetClass.name].fill_labels([None, None], 1, predict) == [1, 1]
    assert predict.asked == []


# -- the wire: codec and publish ------------------------------------------------------------------------

MODELS = {"m": ModelSpec("m", SHAPE, NUM_CLASSES, {"src": (X, Y)})}


def message(kind: Kind, /, **fields: Any) -> dict[str, Any]:
    """A minimal valid request message of ``kind``: an instance without a label, and one with."""
    instances: list[dict[str, Any]] = [{"id": "a", "ref": "src:0"}, {"id": "b", "ref": "src:1", "label": CLASS}]
    if kind.names_targets:
        for inst in instances:
            inst["target"] = 1
    doc: dict[str, Any] = {"schema": "unlearn.request/v1", "request_id": "r-1", "model": "m", "kind": kind.name,
                           "instances": instances}
    if kind.names_class:
        doc["class"] = CLASS
    doc.update(fields)
    return doc


def _check(doc: dict[str, Any]) -> CheckedRequest:
    return check_request(json.dumps(doc).encode(), None, MODELS)


def _rejected(doc: dict[str, Any]) -> Rejection:
    with pytest.raises(Rejection) as info:
        _check(doc)
    return info.value


@pytest.mark.parametrize("name", NAMES)
def test_the_codec_accepts_a_minimal_message_of_every_kind(name: str) -> None:
    kind = get_kind(name)
    checked = _check(message(kind))
    assert (checked.kind, checked.forget_class) == (name, CLASS if kind.names_class else None)
    # a kind that names a class gives it to an instance without a label; others leave it to intake
    assert [i.label for i in checked.instances] == [CLASS if kind.names_class else None, CLASS]
    assert [i.target for i in checked.instances] == ([1, 1] if kind.names_targets else [None, None])


@pytest.mark.parametrize("name", NAMES)
def test_the_codec_wants_a_class_exactly_from_a_kind_that_names_one(name: str) -> None:
    kind = get_kind(name)
    doc = message(kind)
    if kind.names_class:
        del doc["class"]
        exc = _rejected(doc)
        assert (exc.reason, exc.detail) == ("missing_field", f"class is missing: {name} needs the class to forget")
        exc = _rejected(message(kind, instances=[{"id": "a", "ref": "src:0", "label": CLASS - 1}]))
        assert exc.reason == "label_not_class"
    else:
        exc = _rejected(message(kind, **{"class": CLASS}))
        assert exc.reason == "unexpected_field"
        assert exc.detail.startswith("class is only for kind ") and exc.detail.endswith(f", not {name}")
    assert exc.kind == name


@pytest.mark.parametrize("name", NAMES)
def test_the_codec_wants_targets_exactly_from_a_kind_that_names_them(name: str) -> None:
    kind = get_kind(name)
    doc = message(kind)
    if kind.names_targets:
        del doc["instances"][0]["target"]
        exc = _rejected(doc)
        assert (exc.reason, exc.detail) == ("missing_target", f"instances[0].target is missing: {name} needs one")
        doc = message(kind)
        doc["instances"][1]["target"] = CLASS
        assert _rejected(doc).reason == "target_equals_label"
    else:
        doc["instances"][0]["target"] = 1
        exc = _rejected(doc)
        assert exc.reason == "unexpected_field"
        assert exc.detail.startswith("instances[0].target is only for kind ") and exc.detail.endswith(f", not {name}")


def _publish(*argv: str) -> list[dict[str, Any]]:
    from daemon.cli import build_parser
    from daemon.pipeline.cli import _requests_from_args

    args = build_parser().parse_args(["publish", "--model", "m", *argv])
    return [json.loads(value) for _, value in _requests_from_args(args)]


def _publish_args(kind: Kind) -> list[str]:
    argv = ["--kind", kind.name, "--ref", "src:0", "--ref", "src:1"]
    if kind.names_targets:
        argv += ["--target", "1", "--target", "1"]
    if kind.names_class:
        argv += ["--class", str(CLASS)]
    return argv


@pytest.mark.parametrize("name", NAMES)
def test_publish_writes_a_message_the_codec_accepts_for_every_kind(name: str) -> None:
    kind = get_kind(name)
    (doc,) = _publish(*_publish_args(kind))
    checked = _check(doc)
    assert checked.kind == name and len(checked.instances) == 2
    assert ("class" in doc) == kind.names_class
    assert all(("target" in inst) == kind.names_targets for inst in doc["instances"])


@pytest.mark.parametrize("name", [name for name, kind in KINDS.items() if kind.names_targets or kind.names_class])
def test_publish_refuses_a_request_without_its_kinds_fields(name: str) -> None:
    kind = get_kind(name)
    argv = ["--kind", name, "--ref", "src:0"]
    if kind.names_targets:
        with pytest.raises(UsageError, match=f"^{name} needs one --target per --ref$"):
            _publish(*argv, *(["--class", str(CLASS)] if kind.names_class else []))
    if kind.names_class:
        with pytest.raises(UsageError, match=f"^{name} needs --class$"):
            _publish(*argv, *(["--target", "1"] if kind.names_targets else []))


# -- a new kind: one subclass, registered ---------------------------------------------------------------

class Nudge(Kind):
    """A stub kind: every instance names a target; nothing but this class and its registration is new."""

    name: ClassVar[str] = "nudge"
    success: ClassVar[str] = "relabelled"
    names_targets: ClassVar[bool] = True

    def validate(self, request: ForgetRequest, num_classes: int) -> None:
        if request.targets is None or request.targets.shape != request.labels.shape:
            raise ValueError("nudge needs one target per instance")


@pytest.fixture
def nudge(monkeypatch: pytest.MonkeyPatch) -> Kind:
    kind = Nudge()
    monkeypatch.setitem(KINDS, kind.name, kind)
    return kind


def test_a_stub_kind_is_validated_by_its_own_rules(nudge: Kind) -> None:
    assert get_kind("nudge") is nudge
    _validate(valid_request(nudge))
    with pytest.raises(ValueError, match="^nudge needs one target per instance$"):
        _validate(dataclasses.replace(valid_request(nudge), targets=None))


def test_a_stub_kind_is_decoded_by_the_codec_from_its_attributes(nudge: Kind) -> None:
    checked = _check(message(nudge))
    assert checked.kind == "nudge" and [i.target for i in checked.instances] == [1, 1]
    doc = message(nudge)
    del doc["instances"][1]["target"]
    assert _rejected(doc).detail == "instances[1].target is missing: nudge needs one"
    assert _rejected(message(nudge, **{"class": CLASS})).detail == "class is only for kind forget_class, not nudge"
    doc = message(KINDS["forget"])
    doc["instances"][0]["target"] = 1
    assert _rejected(doc).detail == "instances[0].target is only for kind relabel or nudge, not forget"
    bad = _rejected(message(nudge, kind="erase"))
    assert bad.detail == "kind must be one of forget, relabel, forget_class, nudge, got 'erase'"


def test_a_stub_kind_is_offered_and_published_by_the_command_line(nudge: Kind) -> None:
    (doc,) = _publish(*_publish_args(nudge))
    assert doc["kind"] == "nudge" and _check(doc).kind == "nudge"
    with pytest.raises(UsageError, match="^nudge needs one --target per --ref$"):
        _publish("--kind", "nudge", "--ref", "src:0")

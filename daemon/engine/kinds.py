"""Request kinds: what a request asks of the model, as one object per kind, registered by name.

A kind answers every question that used to be a ``kind == "..."`` branch somewhere: what a round's
stopping rule reads (the labels, or the targets), when it is reached, which instances the forget term
still works on, what a successful round is called, how far the round's change may reach (the instances'
neighbourhood, or the whole class), and what the request must carry on the wire (a class, a target per
instance) and how labels left out are filled in. Codec, intake, rounds, session, command line and
benchmark ask the kind; a fourth kind is one more subclass here, registered in :data:`KINDS`, plus its
tests (``tests/test_engine_kinds.py`` runs every rule over every kind).

Kinds compare as strings nowhere else: the wire name is :attr:`Kind.name`, and everything else reads
the kind's attributes and methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol

import torch

__all__ = ["GOALS", "KINDS", "ForgetClass", "ForgetInstances", "Kind", "KindSettings", "Relabel", "RequestFields",
           "check_class_range", "get_kind"]


#: what a request of a kind that ``chooses_goal`` may ask of its instances (contract §2 ``goal``): be
#: misclassified (the paper's goal: the zero rule, ``stop`` "zero") or look like data the model never saw
#: (``stop`` "unseen": stop once indistinguishable from held-out data, ``daemon.engine.unseen``)
GOALS: tuple[str, ...] = ("misclassify", "unseen")


class RequestFields(Protocol):
    """What a kind reads of a request (``daemon.engine.requests.ForgetRequest`` is one): kinds sit below it."""

    kind: str
    labels: torch.Tensor
    targets: torch.Tensor | None
    forget_class: int | None


class KindSettings(Protocol):
    """The settings a kind reads (``daemon.engine.config.UnlearnConfig`` has them): kinds sit below the config."""

    stop: str
    stop_level: float
    forget_margin: float
    class_margin: float
    class_scope: str
    class_copies: int


def check_class_range(what: str, t: torch.Tensor, num_classes: int) -> None:
    """``t`` must hold integer classes in [0, num_classes); ``what`` names them in the error."""
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{what}s must be integers, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{what}s must lie in [0, {num_classes - 1}], got {int(t.min())}..{int(t.max())}")


def label_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − max_{j≠y} z_j per row: positive while ``labels`` wins, negative once it has lost."""
    z_y = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    return z_y - logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)


class Kind:
    """One request kind. Subclasses set the class attributes and override what differs.

    The defaults describe ``forget``: every instance must stop being classified as its label, and the
    round's change stays around the instances (anchors, impressions and the subspace memory apply).
    """

    #: the wire name (contract §2 ``kind``), the receipt's and the bench row's ``kind``
    name: ClassVar[str] = ""
    #: the outcome of a round that reached the goal
    success: ClassVar[str] = "forgotten"
    #: the request names one class to forget (wire field ``class``), and every instance is an example of it
    names_class: ClassVar[bool] = False
    #: every instance names a target class (wire field ``instances[i].target``), different from its label
    names_targets: ClassVar[bool] = False
    #: the change is meant to stay around the instances: affine anchors and class impressions are held beside
    #: them, the subspace memory projects the round's updates and remembers its instances. A kind that is not
    #: (forget_class) changes the model everywhere by design, so it also becomes the reference later rounds'
    #: held examples keep.
    instance_scoped: ClassVar[bool] = True
    #: a round that leaves instances of mixed labels all in one class has collapsed (gradient ascent's
    #: signature, method.md §9); only meaningful where the goal is to leave the labels
    checks_forget_set_collapse: ClassVar[bool] = True
    #: a request may choose its goal (contract §2 ``goal``): be misclassified, or look ``unseen`` (stop once its
    #: instances look like held-out data, ``daemon.engine.unseen``); the other kinds' goal is their own
    chooses_goal: ClassVar[bool] = False

    # -- the goal (engine) ------------------------------------------------------------------------------
    def wanted(self, request: RequestFields) -> torch.Tensor:
        """The classes whose accuracy the stopping rule reads: the labels (to be left) or the targets."""
        return request.labels

    def towards(self, request: RequestFields) -> torch.Tensor | None:
        """Where the forget term pulls each instance by the kind's own definition (None: away from its label)."""
        return None

    def stop_reached(self, acc: float, config: KindSettings) -> bool:
        """Whether the forget-set accuracy ``acc`` meets the goal under the configured stopping rule."""
        level = config.stop_level if config.stop == "calibrated" else 0.0
        return acc <= level + 1e-12

    def forget_margin(self, config: KindSettings) -> float:
        """How far past the boundary the forget term pushes an instance."""
        return config.forget_margin

    def stops_on_margin(self, config: KindSettings) -> bool:
        """Whether the round ends only once every instance is past its margin, not merely misclassified."""
        return config.forget_margin > 0

    def still_active(self, logits: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None,
                     config: KindSettings) -> torch.Tensor:
        """Instances the forget term still works on (a bool per row of ``logits``).

        ``towards``: the method's per-instance targets (the relabelling baselines, and relabel), or None.
        """
        if towards is None and self.stops_on_margin(config):
            return label_margin(logits, labels) > -self.forget_margin(config)
        if towards is not None:
            return logits.argmax(1) != towards
        return logits.argmax(1) == labels

    def class_row_only(self, config: KindSettings) -> bool:
        """Whether the round moves only the forgotten class's row of the output layer."""
        return False

    def copies(self, config: KindSettings) -> int:
        """Affine copies per instance forgotten with it (a class must go as a class, not as its examples)."""
        return 0

    def keeps_unreached_adversarial(self) -> bool:
        """Whether adversarial examples that did not reach their target are held too."""
        return True

    # -- the request (engine and command line) -----------------------------------------------------------
    def validate(self, request: RequestFields, num_classes: int) -> None:
        """The kind's own rules on a request whose common fields are valid; ``ValueError`` names the first fault."""
        if request.targets is not None:
            raise ValueError(f"targets are only for relabel, not {self.name}")
        if request.forget_class is not None:
            raise ValueError(f"forget_class is only for kind forget_class, not {self.name}")

    # -- intake ----------------------------------------------------------------------------------------
    def fill_labels(self, labels: Sequence[int | None], forget_class: int | None,
                    predict: Callable[[list[int]], list[int]]) -> list[int]:
        """Labels for every instance: the request's own where given, else what stands in for them.

        ``predict(indices)`` gives the published model's predictions for those instances (called only when
        some label is missing, and only for those).
        """
        missing = [i for i, lab in enumerate(labels) if lab is None]
        out = list(labels)
        if missing:
            for i, p in zip(missing, predict(missing), strict=True):
                out[i] = p
        return [int(v) for v in out]  # type: ignore[arg-type]  # every None was filled above


class ForgetInstances(Kind):
    """``forget``: every instance must stop being classified as its label (L2UL's misclassification)."""

    name: ClassVar[str] = "forget"
    chooses_goal: ClassVar[bool] = True


class Relabel(Kind):
    """``relabel``: every instance must be classified as its target (L2UL's relabeling)."""

    name: ClassVar[str] = "relabel"
    success: ClassVar[str] = "relabelled"
    names_targets: ClassVar[bool] = True
    checks_forget_set_collapse: ClassVar[bool] = False

    def wanted(self, request: RequestFields) -> torch.Tensor:
        if request.targets is None:
            raise ValueError("relabel needs one target per instance")
        return request.targets

    def towards(self, request: RequestFields) -> torch.Tensor | None:
        return request.targets

    def stop_reached(self, acc: float, config: KindSettings) -> bool:
        return acc >= 1.0

    def stops_on_margin(self, config: KindSettings) -> bool:
        return False

    def validate(self, request: RequestFields, num_classes: int) -> None:
        if request.targets is None or request.targets.shape != request.labels.shape:
            raise ValueError("relabel needs one target per instance")
        check_class_range("target", request.targets, num_classes)
        if bool((request.targets == request.labels).any()):
            raise ValueError("a relabel target must differ from the instance's label")
        if request.forget_class is not None:
            raise ValueError(f"forget_class is only for kind forget_class, not {self.name}")


class ForgetClass(Kind):
    """``forget_class``: the model must stop predicting a class; the instances are examples of it.

    Forgetting a class must generalise to all its inputs, so the round works on the examples and their
    affine copies (``class_copies``), holds only the adversarial examples that left the class, pushes
    past ``class_margin`` and, by default, moves only the class's output row (``class_scope``). It
    changes the model everywhere by design: no anchors, impressions or subspace memory.
    """

    name: ClassVar[str] = "forget_class"
    names_class: ClassVar[bool] = True
    instance_scoped: ClassVar[bool] = False
    checks_forget_set_collapse: ClassVar[bool] = False

    def forget_margin(self, config: KindSettings) -> float:
        return config.class_margin

    def stops_on_margin(self, config: KindSettings) -> bool:
        return True

    def still_active(self, logits: torch.Tensor, labels: torch.Tensor, towards: torch.Tensor | None,
                     config: KindSettings) -> torch.Tensor:
        # a class round's goal is leaving the class, whichever way a method pushes (``towards``: the
        # relabelling baselines), so every method stops on the same rule here
        return label_margin(logits, labels) > -self.forget_margin(config)

    def class_row_only(self, config: KindSettings) -> bool:
        return config.class_scope != "all"

    def copies(self, config: KindSettings) -> int:
        return config.class_copies

    def keeps_unreached_adversarial(self) -> bool:
        # an example the attack could not move out of the class would pin the class's own region in place
        return False

    def validate(self, request: RequestFields, num_classes: int) -> None:
        if request.targets is not None:
            raise ValueError(f"targets are only for relabel, not {self.name}")
        if request.forget_class is None or not 0 <= request.forget_class < num_classes:
            raise ValueError(f"forget_class needs a class in [0, {num_classes - 1}], got {request.forget_class}")
        if bool((request.labels != request.forget_class).any()):
            raise ValueError("every example of a forget_class request must carry that class as its label")

    def fill_labels(self, labels: Sequence[int | None], forget_class: int | None,
                    predict: Callable[[list[int]], list[int]]) -> list[int]:
        # the contract lists "examples of that class": the class is every example's label
        return [int(forget_class if lab is None else lab) for lab in labels]  # type: ignore[arg-type]


#: every request kind, by wire name, in the contract's order
KINDS: dict[str, Kind] = {k.name: k() for k in (ForgetInstances, Relabel, ForgetClass)}


def get_kind(name: str) -> Kind:
    """The kind named ``name``; ``ValueError`` listing the known ones otherwise."""
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown kind {name!r}; known: {', '.join(KINDS)}")
    return kind

"""What a round is asked to do: the three request kinds of the contract, validated before any work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["KINDS", "ForgetRequest"]

Kind = Literal["forget", "relabel", "forget_class"]
KINDS: tuple[str, ...] = ("forget", "relabel", "forget_class")


@dataclass(frozen=True)
class ForgetRequest:
    """The instances of one round and what must become of them.

    - ``forget``: every instance must stop being classified as its label (L2UL's misclassification);
    - ``relabel``: every instance must be classified as its ``targets`` entry (L2UL's relabeling);
    - ``forget_class``: the model must stop predicting ``forget_class``; ``x`` holds examples of it.

    Shape:
        x: N×C×H×W float32 in [0, 1]; labels, targets: N int64.
    """

    kind: str
    x: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor | None = None
    forget_class: int | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def validate(self, *, num_classes: int, input_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` naming the first thing wrong; a valid request passes silently."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.x.dim() != 4 or tuple(self.x.shape[1:]) != tuple(input_shape):
            raise ValueError(f"instances must have shape N×{'×'.join(map(str, input_shape))}, got {tuple(self.x.shape)}")
        if self.x.shape[0] == 0:
            raise ValueError("the forget set is empty")
        if not torch.is_floating_point(self.x) or not bool(torch.isfinite(self.x).all()):
            raise ValueError("instances must be finite floating-point tensors")
        if float(self.x.min()) < 0 or float(self.x.max()) > 1:
            raise ValueError("instance values must lie in [0, 1]")
        if self.labels.shape != (self.x.shape[0],):
            raise ValueError(f"need one label per instance, got {tuple(self.labels.shape)} for {self.x.shape[0]}")
        _check_range("label", self.labels, num_classes)
        if self.kind == "relabel":
            if self.targets is None or self.targets.shape != self.labels.shape:
                raise ValueError("relabel needs one target per instance")
            _check_range("target", self.targets, num_classes)
            if bool((self.targets == self.labels).any()):
                raise ValueError("a relabel target must differ from the instance's label")
        elif self.targets is not None:
            raise ValueError(f"targets are only for relabel, not {self.kind}")
        if self.kind == "forget_class":
            if self.forget_class is None or not 0 <= self.forget_class < num_classes:
                raise ValueError(f"forget_class needs a class in [0, {num_classes - 1}], got {self.forget_class}")
            if bool((self.labels != self.forget_class).any()):
                raise ValueError("every example of a forget_class request must carry that class as its label")
        elif self.forget_class is not None:
            raise ValueError(f"forget_class is only for kind forget_class, not {self.kind}")


def _check_range(what: str, t: torch.Tensor, num_classes: int) -> None:
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{what}s must be integers, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"{what}s must lie in [0, {num_classes - 1}], got {int(t.min())}..{int(t.max())}")

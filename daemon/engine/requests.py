"""What a round is asked to do: a request of one kind (``daemon.engine.kinds``), validated before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daemon.engine.kinds import check_class_range, get_kind

__all__ = ["ForgetRequest"]


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
        kind = get_kind(self.kind)
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
        check_class_range("label", self.labels, num_classes)
        kind.validate(self, num_classes)

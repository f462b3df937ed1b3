"""The classifier head: the layer whose output rows (or channels) are the class logits.

Class rounds scoped to one class's row (``class_scope = "head_row"``) move only this layer's row of
the class, so the rest of the network (and every other class's decision) stays as it was. The head is
either *declared* (a module name such as torchvision ViT's ``"heads.head"``, passed by the caller of
the round or the session; never taken from a request) or *found*: among the ``nn.Linear`` layers with
``num_classes`` outputs and the ``nn.Conv2d`` layers with ``num_classes`` output channels (SqueezeNet's
1×1 conv head before its pooling), the one that runs last in a forward pass on the round's inputs
whose output is ``[N, num_classes]`` (a Linear) or ``[N, num_classes, H, W]`` (a conv). Without
inputs, the last such module in registration order (the historical rule: the last ``nn.Linear``).
Execution order, not ``__init__`` order, is what makes a head defined before other modules correct.
For a conv head, a class's "row" is its output channel (``weight[c]`` and ``bias[c]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from daemon.engine.evaluate import eval_mode

__all__ = ["Head", "find_head", "output_layer"]


@dataclass(frozen=True)
class Head:
    """The head's module name, the module, and whether it was ``declared`` or ``found``."""

    name: str
    module: nn.Linear | nn.Conv2d
    how: str

    def describe(self) -> str:
        return f"classifier head {self.name!r} ({type(self.module).__name__}, {self.how})"


def _width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return None


def _declared(model: nn.Module, name: str, num_classes: int) -> Head:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the declared classifier head {name!r} is not a module of the model; "
                         "name it as model.named_modules() does (e.g. 'heads.head', '1.classifier.3')") from None
    if _width(module) != num_classes:
        raise ValueError(f"the declared classifier head {name!r} is a {type(module).__name__}; it must be an "
                         f"nn.Linear with {num_classes} outputs or an nn.Conv2d with {num_classes} output channels")
    return Head(name, module, "declared")


@torch.no_grad()
def _executed_last(model: nn.Module, candidates: dict[str, nn.Module], x: torch.Tensor,
                   num_classes: int) -> str | None:
    """The candidate that ran last on ``x`` with a logit-shaped output (one eval forward, no gradient)."""
    order: list[str] = []

    def hook(name: str):
        def seen(module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            shape = tuple(out.shape)
            if (len(shape) == 2 if isinstance(module, nn.Linear) else len(shape) == 4) and shape[1] == num_classes:
                order.append(name)
        return seen

    handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
    try:
        with eval_mode(model):
            model(x[:1].to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def find_head(model: nn.Module, num_classes: int, *, head: str | None = None,
              x: torch.Tensor | None = None) -> Head:
    """The classifier head: ``head`` when declared, else found by output width (see the module docstring)."""
    if head is not None:
        return _declared(model, head, num_classes)
    candidates = {n: m for n, m in model.named_modules() if _width(m) == num_classes}
    if not candidates:
        raise ValueError(f"the model has no Linear layer with {num_classes} outputs (nor Conv2d with "
                         f"{num_classes} output channels) to scope a class round to; declare the head by name")
    name = _executed_last(model, candidates, x, num_classes) if x is not None and x.shape[0] else None
    if name is None:
        linear = [n for n, m in candidates.items() if isinstance(m, nn.Linear)]
        name = (linear or list(candidates))[-1]
    return Head(name, candidates[name], "found")


def output_layer(model: nn.Module, num_classes: int, head: str | None = None) -> nn.Linear | nn.Conv2d:
    """The head module (see :func:`find_head`; without inputs, the last ``nn.Linear`` with ``num_classes``
    outputs, else the last ``nn.Conv2d`` with as many output channels)."""
    return find_head(model, num_classes, head=head).module

"""MAS weight importance (Aljundi et al., 2018) as L2UL uses it, and its accumulation across rounds.

L2UL measures MAS *on the forget instances*, then min–max normalises each tensor and inverts it:
parameters that carry the forget set get weight ≈ 0 and may move, the rest get ≈ 1 and are anchored
by a quadratic penalty towards the anchor weights. The paper gives no continual protocol, so how a
new round's importance combines with the earlier ones is a choice (``ACCUMULATIONS``), measured in
the benchmark.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "ACCUMULATIONS",
    "ImportanceRegulariser",
    "accumulate",
    "anchor_weights",
    "importance_density",
    "mas_importance",
]

ACCUMULATIONS = ("none", "sum", "max", "decayed")
_RANGE_EPS = 1e-12


def mas_importance(model: nn.Module, x: torch.Tensor, batch_size: int = 256, *,
                   train: bool = True) -> dict[str, torch.Tensor]:
    """Raw MAS importance on ``x``: |∂ mean_i ‖g(x_i)‖₂ / ∂θ| · b, summed over batches, divided by N.

    As in the official code: non-squared L2 norm of the logits, absolute value of the *batch* gradient,
    measured on a copy in train mode (BatchNorm uses batch statistics). Unlike it, gradients are reset
    between batches (the official code zeroes the wrong optimiser, method.md P9).

    ``train=False`` measures in eval mode: a round passes its ``bn_train`` (False by default), so on a
    model with BatchNorm the importance is measured with the running statistics the round keeps, a
    single instance does not fail BatchNorm's "more than 1 value per channel" check, and Dropout (e.g.
    MobileNetV3's classifier) draws nothing from the global RNG. For a model with neither (the MNIST
    CNN) both modes compute the same numbers. The probe is a copy: the caller's running statistics
    never change either way.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty N×C×H×W batch, got shape {tuple(x.shape)}")
    probe = copy.deepcopy(model)
    probe.train(train)
    device = next(probe.parameters()).device
    params = {n: p for n, p in probe.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        loss = probe(xb).norm(p=2, dim=1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                total[name] += g.abs() * xb.shape[0]
    return {n: (t / x.shape[0]).detach() for n, t in total.items()}


def _normalise_inverted(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per tensor ``1 − (Ω − min)/(max − min)``; a constant tensor carries nothing of the forget set → 1."""
    out = {}
    for name, omega in raw.items():
        lo, hi = omega.min(), omega.max()
        span = hi - lo
        if float(span) <= _RANGE_EPS:
            out[name] = torch.ones_like(omega)
        else:
            out[name] = 1.0 - (omega - lo) / span
    return out


def anchor_weights(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Penalty weights in [0, 1] from raw MAS importance (L2UL's min–max inversion)."""
    return _normalise_inverted(raw)


def accumulate(previous: Mapping[str, torch.Tensor] | None, current: Mapping[str, torch.Tensor],
               mode: str, decay: float = 0.5) -> dict[str, torch.Tensor]:
    """Combine earlier rounds' penalty weights with this round's.

    - ``none``: this round's weights only (each round as if it were the first);
    - ``sum``: weights add up, so parameters anchored round after round become ever stiffer;
    - ``max``: a parameter stays as anchored as it has ever been;
    - ``decayed``: ``decay · previous + current`` (Avalanche-style running importance).
    """
    if mode not in ACCUMULATIONS:
        raise ValueError(f"unknown accumulation {mode!r}; known: {', '.join(ACCUMULATIONS)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must lie in [0, 1], got {decay}")
    if previous is None or mode == "none":
        return {n: t.clone() for n, t in current.items()}
    out = {}
    for name, cur in current.items():
        prev = previous.get(name)
        if prev is None:
            out[name] = cur.clone()
        elif prev.shape != cur.shape:
            raise ValueError(f"importance of {name} changed shape: {tuple(prev.shape)} vs {tuple(cur.shape)}")
        elif mode == "sum":
            out[name] = prev + cur
        elif mode == "max":
            out[name] = torch.maximum(prev, cur)
        else:
            out[name] = decay * prev + cur
    return out


class ImportanceRegulariser:
    """The quadratic anchor ``strength · Σ ½ · w · (θ − θ*)²`` over every trainable parameter.

    ``weights`` are the (accumulated) penalty weights, ``anchor`` the weights θ* to stay near.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                 strength: float) -> None:
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        missing = set(weights) - set(anchor)
        if missing:
            raise ValueError(f"anchor lacks tensors the weights name: {sorted(missing)[:3]}")
        self.weights = dict(weights)
        self.anchor = dict(anchor)
        self.strength = strength

    def _on(self, device: torch.device) -> None:
        """Keep the tensors on the model's device: copied once, not at every step."""
        if getattr(self, "_device", None) != device:
            self.weights = {n: w.to(device) for n, w in self.weights.items()}
            self.anchor = {n: a.to(device) for n, a in self.anchor.items()}
            self._device = device

    def penalty(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        total = torch.zeros((), device=device)
        if self.strength == 0:
            return total
        self._on(device)
        for name, p in model.named_parameters():
            w = self.weights.get(name)
            if w is None or not p.requires_grad:
                continue
            total = total + (w * (p - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.strength * total


def importance_density(weights: Mapping[str, torch.Tensor], threshold: float = 0.5) -> float:
    """Share of parameters whose weight is at least ``threshold`` (held fixed by the penalty); NaN for none."""
    n = sum(w.numel() for w in weights.values())
    if n == 0:
        return float("nan")
    held = sum(int((w >= threshold).sum()) for w in weights.values())
    return held / n

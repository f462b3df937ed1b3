"""MAS importance as a round plugin, carried across committed rounds (Avalanche's regulariser shape).

The estimation is the pure :func:`daemon.engine.importance.mas_importance`; this object is what a
session keeps of it between rounds: the accumulation rule and the accumulated penalty weights of the
committed rounds. A round asks it for its weights (:meth:`ImportancePlugin.round_weights`: this round's
MAS on the instances, accumulated with the committed ones, as L2UL uses the current round's importance
in the round itself) and for the penalty anchored at the model the round starts from
(:meth:`ImportancePlugin.regulariser`, whose ``penalty(model)`` each step adds); after a committed round
the session calls :meth:`ImportancePlugin.consolidate` with the weights that round used.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from daemon.engine.importance import ACCUMULATIONS, ImportanceRegulariser, accumulate, anchor_weights, mas_importance

__all__ = ["ImportancePlugin"]


class ImportancePlugin:
    """The accumulated importance of the committed rounds and how a new round's combines with it.

    Arguments:
        accumulation: how importance combines across rounds (``ACCUMULATIONS``: none, sum, max, decayed).
        decay: the factor of ``decayed`` accumulation.
        weights: the accumulated penalty weights so far (None: no round committed yet).
    """

    def __init__(self, accumulation: str = "max", decay: float = 0.5,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
        self.accumulation = accumulation
        self.decay = decay
        self.weights = None if weights is None else dict(weights)

    @property
    def accumulation(self) -> str:
        return self._accumulation

    @accumulation.setter
    def accumulation(self, mode: str) -> None:
        if mode not in ACCUMULATIONS:
            raise ValueError(f"unknown accumulation {mode!r}; known: {', '.join(ACCUMULATIONS)}")
        self._accumulation = mode

    def round_weights(self, model: nn.Module, x: torch.Tensor, *, train: bool = True) -> dict[str, torch.Tensor]:
        """The penalty weights of a round on ``x``: MAS on ``model`` (in train mode when ``train``, see
        :func:`mas_importance`), inverted, accumulated with the committed rounds' (this object is left as it was)."""
        current = anchor_weights(mas_importance(model, x, train=train))
        return accumulate(self.weights, current, self.accumulation, self.decay)

    @staticmethod
    def regulariser(weights: Mapping[str, torch.Tensor], model: nn.Module, strength: float) -> ImportanceRegulariser:
        """The round's penalty: ``weights`` anchoring ``model``'s parameters where they are now."""
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        return ImportanceRegulariser(weights, anchor, strength)

    def consolidate(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Adopt the weights a committed round used as the accumulated importance (copied to the CPU)."""
        self.weights = {n: t.detach().cpu().clone() for n, t in weights.items()}

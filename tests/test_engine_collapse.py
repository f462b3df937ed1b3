"""The collapse verdict: only a round that *puts* the sentinel's predictions into one class has collapsed."""

from __future__ import annotations

import torch
from torch import nn

from daemon.engine.rounds import _collapsed, _top_share


class _Fixed(nn.Module):
    """Predicts class ``c`` for inputs whose first pixel is below 0.5, else class 1 - c."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.flatten(1)[:, 0] < 0.5
        out = torch.zeros(x.shape[0], 2)
        out[low, self.c] = 1.0
        out[~low, 1 - self.c] = 1.0
        return out


def test_top_share_counts_the_most_frequent_prediction():
    x = torch.tensor([0.1, 0.2, 0.9, 0.3]).view(4, 1, 1, 1)
    assert _top_share(_Fixed(0), x) == 0.75
    assert _top_share(_Fixed(0), x[:1]) == 0.0          # one input says nothing


def test_a_round_that_concentrates_a_spread_sentinel_has_collapsed():
    spread = torch.tensor([0.1, 0.9] * 10).view(20, 1, 1, 1)
    one_class = torch.full((20, 1, 1, 1), 0.1)
    assert _collapsed(_Fixed(0), one_class, 0.9, share_before=0.5)
    assert not _collapsed(_Fixed(0), spread, 0.9, share_before=0.5)


def test_a_sentinel_already_in_one_class_before_the_round_proves_nothing():
    one_class = torch.full((20, 1, 1, 1), 0.1)
    assert not _collapsed(_Fixed(0), one_class, 0.9, share_before=0.95)

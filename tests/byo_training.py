"""An operator's own training loop for the bring-your-own-model tests: their module, their normalisation
(MNIST's 0.1307 / 0.3081, which they then give ``unlearnd import``), nothing of unlearnd's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daemon.data.mnist import load_mnist


def train_operator_model(build: Callable[[], torch.nn.Module], *, steps: int, lr: float = 3e-3, seed: int = 0
                         ) -> torch.nn.Module:
    """``build()`` under ``seed`` (its initial weights are part of the recipe), then ``steps`` Adam steps of
    batch 128 on MNIST's training set, seeded; returned in eval mode."""
    torch.manual_seed(seed)
    net = build()
    m = load_mnist()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, m.train_x.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net((m.train_x[idx] - 0.1307) / 0.3081), m.train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()

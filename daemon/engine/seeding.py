"""One seed, one model: seeded draws from torch's process-wide generator, one thread at a time.

nn.init, dropout and the recipe's ``torch.manual_seed`` all use torch's *global* generator, which every
thread shares. A rebase trains on its own thread while other models pretrain or rebase: seeding the global
generator there and then drawing from it raced with the other thread's seeding and draws, so the rebased
model's initial weights were not the recipe's (lifetime_notes.md, session 14) and two runs of one recipe
gave two models. Holding one lock across "seed, build, train" and restoring the caller's generator state
afterwards makes the recipe's model a function of its seed again, whatever else the process does. The
rounds never need the lock: the engine draws only from its own ``torch.Generator`` objects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: re-entrant: a rebase holds it across build and ``train_classifier``, which takes it again
_GLOBAL_RNG = threading.RLock()


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global generators for the block, hold them for this thread, restore them after."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        yield

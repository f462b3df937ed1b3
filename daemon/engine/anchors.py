"""Data-free anchors built from the forget instances themselves.

The collateral damage of flipping a typical instance is not in a small ball around it (measured at
k = 16: the test digits that flip lie 5–8 L2 from the nearest forget instance, as far as test digits
in general) but along the class boundaries the flip moves: a forgotten 3 that becomes a 5 drags
borderline 3/5 digits with it. The adversarial examples of a tight ball do not reach there. Small
random affine copies of each instance (shift, rotation, scale: the variations its near-duplicates
show) do, and they need nothing but the instance. The round holds them at the model's own logits,
like the adversarial examples, so the function may change at the instance and not at its
natural variations. Measured (MNIST, k = 64, seed 0): test loss 2.65 → 1.3 pp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["deformations"]


def deformations(x: torch.Tensor, per_instance: int, generator: torch.Generator, *, max_shift: float = 0.1,
                 max_rotate_deg: float = 15.0, scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """``per_instance`` random affine copies of every instance (shift as a fraction of the side)."""
    if per_instance <= 0 or x.shape[0] == 0:
        return x.new_zeros((0, *x.shape[1:]))
    xs = x.repeat_interleave(per_instance, 0)
    n = xs.shape[0]
    u = torch.rand((n, 4), generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_rotate_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * 2 * max_shift     # affine_grid coordinates span [-1, 1]
    ty = (u[:, 3] * 2 - 1) * 2 * max_shift
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(xs.dtype), list(xs.shape), align_corners=False)
    return F.grid_sample(xs, grid.to(xs.device), padding_mode="zeros", align_corners=False).clamp(0, 1)

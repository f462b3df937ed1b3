"""Which parameters the subspace memory protects, which it leaves out, and why (per layer type).

The memory (``daemon.engine.subspace``) projects a layer's update off the input rows the layer saw on
earlier rounds' instances. That needs a layer whose weight is a map of rows a forward hook can see:

- ``nn.Linear`` (on any leading shape: a transformer's token MLP too) and ``nn.Conv2d`` with zero
  padding given as numbers (any stride, dilation and groups). A grouped or depthwise conv's output
  channel of group g acts on group g's input patches only; the memory keeps one basis per layer over
  every group's patches (a row is one group's patch), so each group's update is projected off the
  union of all groups' directions: exact protection for every group, at the price of filling the
  layer faster than a per-group basis would (a depthwise 3×3 conv has only 10 directions).
- Self-attention (``nn.MultiheadAttention`` with one packed ``in_proj_weight``): its input projection is
  held on the query's token rows and its ``out_proj`` on the attention output before it. No hook sees
  either (``F.multi_head_attention_forward`` reads the weights without calling a module), so the memory
  captures them under a ``TorchFunctionMode`` (``daemon.engine.subspace._AttentionInputs``): the query as
  it is passed, and the pre-``out_proj`` output by re-running the call with an identity ``out_proj``
  (exact). Attention with separate q/k/v weights or ``add_bias_kv`` is left out, with that reason; in
  cross-attention (query not the key) the input projection sees no rows, so nothing of it is held.
- Left out, each with its reason (``protection_report``): normalisation affine parameters (BatchNorm,
  LayerNorm, GroupNorm: a per-channel scale and shift, not a map of input rows); free parameters a
  module reads itself (class tokens, positional embeddings, ``nn.Embedding``); convs with another padding
  mode or string padding (``F.unfold`` pads with zeros, by numbers only), and other layer types.

Left out means the layer may move freely in a round: what it computes on earlier rounds' instances is not
held by the memory (the held examples and the importance penalty still act on it). Measured on a tiny,
untrained torchvision ViT (1×28×28, patch 7, one layer, hidden 16, random head; two k = 4 ``adv_imp``
rounds with the default preset, tests/test_engine_byo_layers.py): with attention left out, the left-out
parameters were 29% of the trainable values and took 12.4% of the first round's squared update
(``unprotected_update_share``) but 54.4% of the second's, once the memory held the first round (the
projection pushes the update onto what it leaves out). On the trained 4-layer ViT of issue 20's benchmark
that cost relapse: after ten rounds of 32, 84–90% of the earlier rounds' instances were classified
correctly again (benchmarks/results/byo_notes.md). With self-attention protected, LayerNorm, the class
token and the positional embedding are what is left: 7.6% of the tiny ViT's values; held, the ViT's attention
fills in one round of 32 like its token MLPs (17 rows per image), and LayerNorm and the positional embedding
still carry relapse. MobileNetV3-Small leaves out only its BatchNorm affine parameters (0.8% of its values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Protection", "leave_out_reason", "protection_report", "unprotected_update_share"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def attention_reason(module: nn.MultiheadAttention) -> str | None:
    """Why an attention block's projections cannot be protected (None: they can, see the module docstring)."""
    if not module._qkv_same_embed_dim:
        return "attention with separate q/k/v projection weights (kdim or vdim differ from embed_dim)"
    if module.bias_k is not None:
        return "attention with add_bias_kv (learned key/value biases are free parameters)"
    return None


def leave_out_reason(module: nn.Module, inside_attention: nn.MultiheadAttention | None = None) -> str | None:
    """Why the memory cannot protect ``module``'s weight (None: it can); parameters of the module itself only.
    ``inside_attention``: the attention block ``module`` belongs to (its ``out_proj``)."""
    if inside_attention is not None:
        return attention_reason(inside_attention)
    if isinstance(module, nn.MultiheadAttention):
        return attention_reason(module)
    if isinstance(module, _NORMS):
        return "normalisation affine parameters (per-channel scale and shift, not a map of input rows)"
    if isinstance(module, nn.Embedding):
        return "embedding table (rows are looked up, not a map of input rows)"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if not isinstance(module.padding, tuple):
            return f"Conv2d with string padding {module.padding!r} (the memory unfolds patches with numeric padding)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode {module.padding_mode!r} (the memory unfolds patches with zero padding)"
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} (the memory unfolds the patches of plain Conv2d layers only)"
    return (f"free parameter of {type(module).__name__} (read by its own forward, e.g. a class token or a "
            "positional embedding: not a layer's map of input rows)")


def _attention_children(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    inside: dict[str, nn.MultiheadAttention] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            for child, _ in m.named_modules():
                if child:
                    inside[f"{name}.{child}" if name else child] = m
    return inside


def layer_reasons(model: nn.Module) -> dict[str, str | None]:
    """Per module that owns a trainable parameter itself, why it is left out (None: protected)."""
    inside = _attention_children(model)
    out: dict[str, str | None] = {}
    for name, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            out[name] = leave_out_reason(m, inside.get(name))
    return out


@dataclass(frozen=True)
class Protection:
    """Parameters by name: those the memory protects (with their layer type) and those it leaves out (why)."""

    protected: dict[str, str]
    left_out: dict[str, str]
    counts: dict[str, int]

    @property
    def protected_share(self) -> float:
        """The share of trainable parameter values in protected layers."""
        total = sum(self.counts.values())
        return sum(self.counts[n] for n in self.protected) / total if total else 0.0

    def describe(self) -> str:
        """A few lines for a log: what is protected, and each reason with the parameters it leaves out."""
        lines = [f"subspace memory protects {len(self.protected)} parameters "
                 f"({self.protected_share:.1%} of trainable values)"]
        by_reason: dict[str, list[str]] = {}
        for name, why in self.left_out.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"  left out ({why}): {shown}")
        return "\n".join(lines)


def protection_report(model: nn.Module) -> Protection:
    """Which trainable parameters the memory protects and which it leaves out, with the reason per layer."""
    reasons = layer_reasons(model)
    protected: dict[str, str] = {}
    left_out: dict[str, str] = {}
    counts: dict[str, int] = {}
    for mod_name, m in model.named_modules():
        if mod_name not in reasons:
            continue
        for p_name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            counts[full] = p.numel()
            why = reasons[mod_name]
            if why is None:
                protected[full] = type(m).__name__
            else:
                left_out[full] = why
    return Protection(protected, left_out, counts)


def unprotected_update_share(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                             report: Protection) -> float:
    """The share of a round's squared update (``after - before``) that falls on left-out parameters."""
    total = free = 0.0
    for name in report.counts:
        d = float((after[name].float() - before[name].float()).pow(2).sum())
        total += d
        if name in report.left_out:
            free += d
    return free / total if total > 0 else 0.0

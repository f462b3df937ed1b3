"""The operator's reference models: what the ``unseen`` goal's per-example check compares each instance with.

The probe check (``daemon.engine.unseen.HeldOutReference``) places an instance against typical held-out examples of
its label, and so calls a memorised mislabeled record forgotten before any step (benchmarks/results/privacy.md).
An operator who keeps reference models — the model's recipe trained on data without the instance, e.g. on random
halves of the training set, as a membership audit's shadows are — gives the daemon what a model that never saw
the instance predicts *for that instance* ([[models]] ``references``). Each reference is a state dict of the
model's own architecture (``<name>.safetensors``, or a ``torch.save``'d dict read with ``weights_only``), with an
optional ``<name>.idx.npy`` listing the indices of ``references_source`` it trained on: a reference is used for
an instance only if it did not train on it. An instance every reference trained on (with R references on random
halves, one in 2^R) is placed by the gap between models that trained on an instance and models that did not,
measured on the round's instances that have both (LiRA's IN − OUT shift, pooled): its scores minus that gap. An
instance the daemon cannot place at all (an inline input, a ref into another source, or an all-trained-on one in a
round with no instance to measure the gap on) is compared with all of them: for a training record that errs
towards stopping early, and the receipt's interval says how few models were behind it.

Cost: one forward of each reference over the round's instances, once per round (the references do not move).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import nn

from daemon.data.sources import RefError, Source, locate_ref
from daemon.engine.evaluate import logits as model_logits
from daemon.engine.models import BACKBONE
from daemon.engine.unseen import confidence_score

__all__ = ["ReferenceModels", "ReferencesError", "load_references", "out_of_sample"]

log = structlog.get_logger("unlearnd.references")


class ReferencesError(ValueError):
    """The configured reference models cannot be used (named file, reason)."""


@dataclass
class ReferenceModels:
    """Loaded reference models and, per model, the sorted training indices of ``source`` it saw (None: unknown)."""

    models: list[nn.Module]
    trained_on: list[np.ndarray | None]
    source: str
    names: list[str]

    def scores(self, x: torch.Tensor, labels: torch.Tensor, refs: Sequence[str | None],
               sources: Mapping[str, Source]) -> torch.Tensor:
        """The instances' logit-scaled confidence under each reference, ``[instances, models]``; NaN where a
        reference trained on the instance (one every reference trained on: :func:`out_of_sample`)."""
        out = torch.stack([confidence_score(model_logits(m, x), labels).double() for m in self.models], dim=1)
        saw = torch.zeros(out.shape, dtype=torch.bool)
        for i, ref in enumerate(refs):
            index = self._index(ref, sources)
            if index is not None:
                saw[i] = torch.tensor([t is not None and bool(np.isin(index, t)) for t in self.trained_on])
        return out_of_sample(out, saw)

    def _index(self, ref: str | None, sources: Mapping[str, Source]) -> int | None:
        if ref is None or not self.source:
            return None
        try:
            name, index = locate_ref(ref, sources)
        except RefError:
            return None
        return index if name == self.source else None


def out_of_sample(scores: torch.Tensor, saw: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN where the reference trained on the instance (``saw``). An instance every reference
    trained on gets its scores shifted down by the round's pooled IN − OUT gap (the mean, over instances some
    references trained on and some did not, of their IN mean minus their OUT mean), or keeps them unshifted when
    no instance of the round has both (see the module docstring)."""
    everyone = saw.all(dim=1)
    out = scores.masked_fill(saw & ~everyone[:, None], float("nan"))
    if not bool(everyone.any()):
        return out
    mixed = saw.any(dim=1) & ~everyone
    gap = 0.0
    if bool(mixed.any()):
        s, m = scores[mixed].double(), saw[mixed]
        gap = float(((s * m).sum(1) / m.sum(1) - (s * ~m).sum(1) / (~m).sum(1)).mean())
        out[everyone] = scores[everyone] - gap
    log.info("references_all_trained_on", instances=int(everyone.sum()), references=int(saw.shape[1]),
             shifted_by=round(gap, 3), measured_on=int(mixed.sum()))
    return out


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strictly, as the registry holds the model (``Sequential(normalize, backbone)``: ``model.safetensors``), or
    as ``unlearnd import`` takes weights (the operator's own module: the backbone, the normalisation kept)."""
    wrapped = isinstance(model, nn.Sequential) and len(model) == 2
    if wrapped and not any(k.startswith(f"{BACKBONE}.") for k in state):
        model[int(BACKBONE)].load_state_dict(state, strict=True)
    else:
        model.load_state_dict(state, strict=True)


def load_references(folder: str | Path, like: nn.Module, source: str = "") -> ReferenceModels:
    """Every ``*.safetensors`` / ``*.pt`` state dict in ``folder`` loaded strictly into a copy of ``like`` (the live
    model: the same architecture); ReferencesError naming the file that does not fit."""
    from daemon.registry.importer import ImportRejected, load_weights

    root = Path(folder)
    if not root.is_dir():
        raise ReferencesError(f"references {root}: no such folder")
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".pt") and p.is_file())
    if not files:
        raise ReferencesError(f"references {root}: no *.safetensors or *.pt reference model in it")
    models, trained_on = [], []
    for path in files:
        try:
            state = load_weights(path)
            model = copy.deepcopy(like)
            _load_state(model, state)
        except (ImportRejected, RuntimeError) as exc:
            raise ReferencesError(f"references {path}: not a state dict of this model's architecture: "
                                  f"{str(exc).splitlines()[0]}") from exc
        models.append(model.eval())
        idx_path = path.with_suffix(".idx.npy")
        if not idx_path.exists():
            trained_on.append(None)
            continue
        try:
            idx = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ReferencesError(f"references {idx_path}: not a .npy array: {exc}") from exc
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ReferencesError(f"references {idx_path}: must be a 1-d array of integer indices, got "
                                  f"{idx.dtype} {idx.shape}")
        trained_on.append(np.sort(idx))
    if any(t is not None for t in trained_on) and not source:
        raise ReferencesError(f"references {root}: .idx.npy files need references_source (the source they number)")
    return ReferenceModels(models, trained_on, source, [p.name for p in files])

"""A gradient-projection memory across rounds (GPM, Saha et al., ICLR 2021), kept as subspaces only.

Why: in continual rounds each round's collateral damage is small where it acts but it erodes the
margins of inputs far away (MNIST, 10 rounds × 32: median test margin 10.6 → 7.7 logits after two
rounds), later rounds push those inputs over, and they pull earlier-forgotten instances back across
the boundary (relapse). The held examples of a round only see the neighbourhood of *its* instances.
After a round commits, this memory stores, per layer, an orthonormal basis of the input directions
that carry the share ``energy`` of the layer's input activations on the round's instances (and, with
``memory_copies``, their affine copies), measured on the *unlearned* model. Later rounds' weight updates
are projected off those directions, so what the layers compute on the earlier instances' features stays as
it was, and a later round must forget through directions the earlier ones did not use. The default keeps
all but 1e-5 of the instances' own energy: every layer then computes on an earlier instance what it
computed when its round committed, so a forgotten instance cannot come back (relapse 0), which is what
lets later rounds hold their examples at the original model's outputs. Measured (MNIST, 10 × 32;
mnist_notes.md): cumulative test loss 24.4 pp without a memory, 17.8 pp with energy 0.97 over the
instances and 16 copies each (relapse 15%), 3.8–4.8 pp with the exact instance memory (relapse ≤ 0.3%).
The price is room: a digit's patches span all of ``conv1``'s input directions, so the convolutions stop
changing after the first round, and every layer fills up as instances accumulate (``fill``).

At rest the memory is only orthonormal bases of feature-space directions, never inputs, persisted
beside the accumulated importance in the session state. Like the importance, the bases are derived
from the forgotten instances' hidden features: an orthonormal rotation mixes a round's instances, but
the span they give is the span of those features, so this is more than a hash (though no input can be
read back from it without searching the model's input space): an operator who must keep nothing
derived sets ``memory_energy = 0``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from daemon.engine.protection import layer_reasons

__all__ = ["InProjection", "SubspaceMemory", "layer_input_covariances", "protectable_layers"]


class InProjection:
    """The packed q/k/v input projection of an ``nn.MultiheadAttention`` as a layer the memory can hold:
    ``weight`` and ``bias`` are the block's ``in_proj_weight`` and ``in_proj_bias`` (a map of the query's
    token rows, like a Linear's). Not a module: its inputs are seen by :class:`_AttentionInputs`."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        self.attention = attention

    @property
    def weight(self) -> nn.Parameter:
        return self.attention.in_proj_weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.attention.in_proj_bias


def protectable_layers(model: nn.Module) -> dict[str, nn.Module | InProjection]:
    """Linear and Conv2d layers (zero, numeric padding; any stride, dilation, groups) with a trainable
    weight, and the projections of self-attention blocks (``nn.MultiheadAttention``: its packed input
    projection as :class:`InProjection` under the block's name, its ``out_proj`` under its own), by name.
    What is left out and why: ``daemon.engine.protection.protection_report``."""
    reasons = layer_reasons(model)
    out: dict[str, nn.Module | InProjection] = {}
    for name, m in model.named_modules():
        if name not in reasons or reasons[name] is not None:
            continue
        if isinstance(m, nn.MultiheadAttention):
            if m.in_proj_weight is not None and m.in_proj_weight.requires_grad:
                out[name] = InProjection(m)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:
            out[name] = m
    return out


class _AttentionInputs(TorchFunctionMode):
    """Sees what ``F.multi_head_attention_forward`` feeds its two projections, which no hook can: the query's
    token rows (the packed input projection's input, in self-attention, where query, key and value are one
    tensor) and the attention output before ``out_proj`` (the same call with an identity ``out_proj``: exact,
    whatever ``out_proj``'s weights are). ``record(name, rows)`` gets them under the layers' names."""

    def __init__(self, blocks: Mapping[int, tuple[str | None, str | None]], record) -> None:  # noqa: ANN001
        super().__init__()
        self.blocks = blocks            # id(in_proj_weight) -> (in-projection name, out_proj name)
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        a = bound.arguments
        names = self.blocks.get(id(a["in_proj_weight"]))
        if names is None:
            return func(*args, **kwargs)
        in_name, out_name = names
        query = a["query"]
        if in_name is not None and query is a["key"] and a["key"] is a["value"]:
            self.record(in_name, query.reshape(-1, query.shape[-1]))
        if out_name is not None:
            width = a["out_proj_weight"].shape[1]
            a["out_proj_weight"] = torch.eye(width, dtype=query.dtype, device=query.device)
            a["out_proj_bias"] = None if a["out_proj_bias"] is None else torch.zeros_like(a["out_proj_bias"])
            pre = func(*bound.args, **bound.kwargs)[0]
            self.record(out_name, pre.reshape(-1, pre.shape[-1]))
        return func(*args, **kwargs)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _rows(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """The layer's input as one row per weight application (a conv: one per output position and group),
    with a trailing 1 where the layer has a bias: the update of [W | b] acts on exactly these rows. A
    grouped conv's rows are each group's patches (``F.unfold`` orders channels outermost), all in the
    one ``C_in / groups · kh · kw`` space its weight rows live in."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(inp, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)
        g = module.groups
        if g == 1:
            inp = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            n, width, positions = cols.shape
            inp = cols.reshape(n, g, width // g, positions).permute(0, 1, 3, 2).reshape(-1, width // g)
    else:
        inp = inp.reshape(-1, inp.shape[-1])
    if module.bias is None:
        return inp
    return torch.cat([inp, inp.new_ones(inp.shape[0], 1)], 1)


def _input_width(module: nn.Module) -> int:
    weight = module.weight
    return int(weight[0].numel()) + (module.bias is not None)


class LayerInputs:
    """A layer's input rows ``A`` over some inputs: the rows themselves while there are no more of them than
    their width, else ``AᵀA``.

    Why both: the memory needs ``AᵀA``'s eigenvectors, and a wide layer seen on few rows (ResNet-18's
    ``layer4`` convs: 4,608-wide patches, one position per instance at 28×28, so 64 rows in a k = 64 round)
    has a rank-64 covariance whose full ``eigh`` costs 35 s a layer on one core, where the rows' thin SVD
    gives the same eigenpairs (``S²``, ``V``) in 20 ms (measured here, float64). A narrow layer seen on
    many rows (a first conv: 9-wide patches, 50,176 of them) keeps the small covariance.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: torch.Tensor | None = None
        self.cov: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        if self.cov is not None:
            self.cov += rows.T @ rows
            return
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
        if self.rows.shape[0] > self.width:
            self.cov, self.rows = self.rows.T @ self.rows, None

    def to_cpu(self) -> None:
        self.rows = None if self.rows is None else self.rows.cpu()
        self.cov = None if self.cov is None else self.cov.cpu()

    def covariance(self) -> torch.Tensor:
        """``AᵀA`` (float64)."""
        return self.cov if self.cov is not None else self.rows.T @ self.rows  # type: ignore[union-attr]

    def total(self) -> float:
        """The rows' energy, ``trace(AᵀA)``."""
        return float(torch.trace(self.cov)) if self.cov is not None else float((self.rows ** 2).sum())  # type: ignore[operator]

    def energy_in(self, basis: torch.Tensor) -> float:
        """The rows' energy inside the span of ``basis``'s orthonormal columns, ``trace(Bᵀ AᵀA B)``."""
        if self.cov is not None:
            return float(torch.trace(basis.T @ self.cov @ basis))
        return float(((self.rows @ basis) ** 2).sum())  # type: ignore[operator]

    def top_directions(self, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The eigenvalues (descending) and eigenvectors (columns) of ``AᵀA`` off ``basis``'s span, and the
        energy ``basis`` already holds."""
        if self.cov is None:
            rows = self.rows  # type: ignore[assignment]
            residual = rows if basis is None else rows - (rows @ basis) @ basis.T
            kept = 0.0 if basis is None else self.total() - float((residual ** 2).sum())
            _, singular, vh = torch.linalg.svd(residual, full_matrices=False)
            return singular ** 2, vh.T, kept
        residual, kept = self.cov, 0.0
        if basis is not None:
            proj = torch.eye(self.cov.shape[0], dtype=self.cov.dtype) - basis @ basis.T
            residual = proj @ self.cov @ proj
            kept = self.total() - float(torch.trace(residual))
        values, vectors = torch.linalg.eigh((residual + residual.T) / 2)
        return values.flip(0), vectors.flip(1), kept


@torch.no_grad()
def layer_inputs(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, LayerInputs]:
    """Every protectable layer's input rows over ``x`` (float64, on the CPU), in eval mode."""
    layers = protectable_layers(model)
    seen: dict[str, LayerInputs] = {}

    def record(name: str, inp: torch.Tensor) -> None:
        rows = _rows(layers[name], inp.detach()).double()
        seen.setdefault(name, LayerInputs(rows.shape[1])).add(rows)

    def hook(name: str):
        def on_forward(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            record(name, args[0])
        return on_forward

    blocks: dict[int, tuple[str | None, str | None]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out_name = f"{name}.out_proj" if name else "out_proj"
            blocks[id(m.in_proj_weight)] = (name if name in layers else None,
                                            out_name if out_name in layers else None)
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items() if isinstance(m, nn.Module)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with _AttentionInputs(blocks, record) if blocks else contextlib.nullcontext():
            for start in range(0, x.shape[0], batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for inputs in seen.values():
        inputs.to_cpu()
    return seen


def layer_input_covariances(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Uncentred covariance (AᵀA) of every protectable layer's input rows over ``x``, in eval mode."""
    return {n: inputs.covariance() for n, inputs in layer_inputs(model, x, batch_size).items()}


class SubspaceMemory:
    """Per layer, an orthonormal basis (columns) of protected input directions of [W | b].

    ``energy`` in (0, 1): a round adds the fewest new directions that, with the ones already kept,
    hold this share of its instances' input energy (GPM's threshold); 0 turns the memory off.
    """

    def __init__(self, energy: float, bases: Mapping[str, torch.Tensor] | None = None) -> None:
        if not 0.0 <= energy < 1.0:
            raise ValueError(f"memory energy must lie in [0, 1), got {energy}")
        self.energy = energy
        self.bases: dict[str, torch.Tensor] = {n: b.clone() for n, b in (bases or {}).items()}

    @property
    def enabled(self) -> bool:
        return self.energy > 0

    def dims(self) -> dict[str, int]:
        """Protected directions per layer (reported per round)."""
        return {n: int(b.shape[1]) for n, b in self.bases.items()}

    def fill(self) -> dict[str, float]:
        """Per layer, the share of its input directions that are protected. A layer at 1 can no longer
        change for instance rounds; once every layer an instance passes through is full, forgetting
        new instances exhausts its budget (the memory's capacity: ~1,500 instances for mnist_cnn)."""
        return {n: int(b.shape[1]) / int(b.shape[0]) for n, b in self.bases.items()}

    def extended(self, model: nn.Module, x: torch.Tensor) -> SubspaceMemory:
        """A new memory that also protects what ``model`` computes on ``x`` (this one is unchanged)."""
        out = SubspaceMemory(self.energy, self.bases)
        if not self.enabled or x.shape[0] == 0:
            return out
        for name, inputs in layer_inputs(model, x).items():
            out.bases[name] = _grow(inputs, self.bases.get(name), self.energy)
        return out

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """The memory's layers in ``model``; a basis for a missing layer or of the wrong size is refused."""
        layers = protectable_layers(model)
        unknown = sorted(set(self.bases) - set(layers))
        if unknown:
            raise ValueError(f"the subspace memory names layers the model lacks: {unknown[:3]}")
        for name, basis in self.bases.items():
            width = _input_width(layers[name])
            if basis.dim() != 2 or basis.shape[0] != width or basis.shape[1] > width:
                raise ValueError(f"the subspace memory of {name} has shape {tuple(basis.shape)}; "
                                 f"the layer takes {width}-wide input rows")
        return layers

    def free_share(self, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
        """Per protected layer, the share of ``x``'s input energy that lies off the protected directions:
        how much of what the layer sees of ``x`` a projected update can still act on."""
        out: dict[str, float] = {}
        for name, inputs in layer_inputs(model, x).items():
            basis = self.bases.get(name)
            if basis is None:
                continue
            total = inputs.total()
            kept = inputs.energy_in(basis.double())
            out[name] = max(total - kept, 0.0) / total if total > 0 else 0.0
        return out

    def projector(self, model: nn.Module, x: torch.Tensor | None = None,
                  freeze_below: float = 0.0) -> _UpdateProjector | None:
        """Call ``before()`` ahead of ``optimizer.step()`` and ``after()`` right after it.

        With the round's instances ``x``, a layer whose free directions carry less than ``freeze_below``
        of their input energy does not move at all in the round (``frozen``): Adam scales every weight's
        step to about ``lr`` whatever its gradient, so a nearly full layer would otherwise keep moving at
        full speed in directions the instances barely use, but other inputs do. Measured (MNIST 10 x 32,
        a label-smoothed model whose output layer filled to 105 of 129 directions with 3e-4 of the
        instances' energy left free): 5.58 -> 3.42 pp test loss after ten rounds, relapse 26% -> 0
        (mnist_notes.md, session 9). A round also leaves the frozen layers out of its optimiser
        (``frozen_parameters``), so they take no part in the held/forget gradient balance and the backward
        pass stops above them (the benchmark's 10 x 32 at three seeds: 3.02 -> 2.76 pp, rounds ~27% faster;
        mnist_notes.md, session 10)."""
        if not self.enabled or not self.bases:
            return None
        layers = self.check(model)
        frozen: set[str] = set()
        if x is not None and freeze_below > 0:
            frozen = {n for n, share in self.free_share(model, x).items() if share < freeze_below}
        return _UpdateProjector({n: (layers[n], b) for n, b in self.bases.items()}, frozen)

    # -- persistence (tensors for safetensors) ------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: b.contiguous() for n, b in self.bases.items()}


def _grow(inputs: LayerInputs, basis: torch.Tensor | None, energy: float) -> torch.Tensor:
    """GPM's step: add the top residual directions until the kept share of energy reaches ``energy``."""
    total = inputs.total()
    if total <= 0:
        return basis if basis is not None else torch.zeros((inputs.width, 0))
    old = None if basis is None else basis.double()
    values, vectors, kept = inputs.top_directions(old)
    r = 0
    while r < values.shape[0] and kept / total < energy and float(values[r]) > 0:
        kept += float(values[r])
        r += 1
    new = vectors[:, :r]
    if old is not None:
        new = torch.cat([old, new], 1)
    q, _ = torch.linalg.qr(new)
    return q.float().contiguous()


class _UpdateProjector:
    """Projects each optimiser update of [W | b] off the protected input directions (exactly, after
    Adam's per-weight scaling, which a gradient projection would not survive)."""

    def __init__(self, layers: Mapping[str, tuple[nn.Module, torch.Tensor]],
                 frozen: set[str] | frozenset[str] = frozenset()) -> None:
        #: layers that keep their weights for the whole round (``SubspaceMemory.projector``)
        self.frozen = frozenset(frozen)
        self.layers = {}
        for name, (module, basis) in layers.items():
            device = module.weight.device
            self.layers[name] = (module, basis.to(device))
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The weights and biases of the frozen layers: a round leaves them out of its optimiser."""
        out: list[nn.Parameter] = []
        for name in sorted(self.frozen):
            module = self.layers[name][0]
            out += [module.weight] + ([] if module.bias is None else [module.bias])
        return out

    @torch.no_grad()
    def before(self) -> None:
        self._before = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                        for n, (m, _) in self.layers.items()}

    @torch.no_grad()
    def after(self) -> None:
        for name, (module, basis) in self.layers.items():
            w0, b0 = self._before[name]
            if name in self.frozen:
                module.weight.copy_(w0)
                if b0 is not None:
                    module.bias.copy_(b0)
                continue
            delta = (module.weight - w0).reshape(w0.shape[0], -1)
            if b0 is not None:
                delta = torch.cat([delta, (module.bias - b0).unsqueeze(1)], 1)
            delta = delta - (delta @ basis) @ basis.T
            if b0 is not None:
                module.bias.copy_(b0 + delta[:, -1])
                delta = delta[:, :-1]
            module.weight.copy_(w0 + delta.reshape(w0.shape))
        self._before = {}

"""daemon.engine.session: continual rounds, importance accumulation, and exact save/restore."""

from __future__ import annotations

import functools

import pytest
import safetensors.torch
import torch
from torch import nn

from daemon.engine.importance import anchor_weights, mas_importance
from daemon.engine.models import build_model
from daemon.engine.requests import ForgetRequest
from daemon.engine.session import UnlearningSession
from daemon.engine.subspace import protectable_layers
from tests.engine_fixtures import (
    INPUT_SHAPE,
    MEAN,
    NUM_CLASSES,
    STD,
    fast_config,
    forget_set,
    new_model,
    state_equal,
    synthetic,
    tiny_model,
)

CONFIG = fast_config(lr=1e-3)


@functools.lru_cache(maxsize=None)
def _sentinel() -> torch.Tensor:
    return synthetic(16, seed=1)[0]


def _request(r: int) -> ForgetRequest:
    """Round r's forget set: 4 training instances, disjoint across rounds."""
    x, y = forget_set(4, 8 + 4 * r)
    return ForgetRequest("forget", x, y)


def _run(session: UnlearningSession, r: int, **kw):
    kw.setdefault("config", CONFIG)
    result, combined = session.run_round(_request(r), method="adv_imp", sentinel=_sentinel(), **kw)
    return result, combined


def _session(model: nn.Module | None = None, **kw) -> UnlearningSession:
    kw.setdefault("seed", 5)
    return UnlearningSession(model if model is not None else tiny_model(), num_classes=NUM_CLASSES, **kw)


def _bytes_roundtrip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(safetensors.torch.save(tensors))


def test_a_restored_session_continues_bit_identically_to_an_uninterrupted_one():
    live = _session(accumulation="max")
    for r in range(2):
        result, _ = _run(live, r)
        assert result.outcome == "forgotten"
    assert live.rounds_applied == 2
    # save everything a daemon would: the session tensors and metadata, and the live weights
    tensors, meta = live.state()
    saved_tensors = safetensors.torch.save(tensors)
    saved_weights = safetensors.torch.save({k: v.contiguous() for k, v in live.model.state_dict().items()})

    uninterrupted, _ = _run(live, 2)

    fresh = new_model(seed=123)                                  # different init: only the saved weights count
    fresh.load_state_dict(safetensors.torch.load(saved_weights))
    restored = UnlearningSession.restore(fresh, safetensors.torch.load(saved_tensors), dict(meta))
    assert restored.rounds_applied == 2 and restored.seed == 5 and restored.accumulation == "max"
    resumed, _ = _run(restored, 2)

    assert uninterrupted.outcome == resumed.outcome == "forgotten"
    assert uninterrupted.steps == resumed.steps
    assert state_equal(uninterrupted.state, resumed.state)
    assert state_equal(live.model.state_dict(), restored.model.state_dict())
    assert state_equal(live.importance, restored.importance)
    assert state_equal(live.memory.bases, restored.memory.bases) and live.memory.bases
    assert state_equal(live.original, restored.original)
    assert live.rounds_applied == restored.rounds_applied == 3


def test_session_state_serialises_through_safetensors_bytes():
    session = _session()
    _run(session, 0)
    tensors, meta = session.state()
    assert meta["has_importance"] and meta["state_version"] == 2 and meta["rounds_applied"] == 1
    names = {n for n, _ in session.model.named_parameters()}
    layers = set(protectable_layers(session.model))
    assert layers and set(session.memory.bases) == layers
    assert set(tensors) == ({f"original/{n}" for n in names} | {f"importance/{n}" for n in names}
                            | {f"subspace/{n}" for n in layers})
    back = _bytes_roundtrip(tensors)
    assert state_equal(back, tensors)
    restored = UnlearningSession.restore(tiny_model(), back, meta)
    assert state_equal(restored.importance, session.importance)
    assert state_equal(restored.memory.bases, session.memory.bases)
    assert restored.memory.energy == session.memory.energy


def test_a_new_session_saves_its_original_weights_and_no_importance():
    model = tiny_model()
    tensors, meta = _session(model).state()
    assert not meta["has_importance"] and meta["rounds_applied"] == 0
    assert state_equal({k.split("/", 1)[1]: v for k, v in tensors.items()}, dict(model.named_parameters()))
    restored = UnlearningSession.restore(tiny_model(), _bytes_roundtrip(tensors), meta)
    assert restored.importance is None


def test_sum_accumulation_adds_up_the_weights_of_each_round():
    session = _session(accumulation="sum")
    first_weights = anchor_weights(mas_importance(session.model, _request(0).x))
    result, combined_1 = _run(session, 0)
    assert result.succeeded
    assert state_equal(combined_1, first_weights)

    second_weights = anchor_weights(mas_importance(session.model, _request(1).x))   # on the model round 1 left
    result, combined_2 = _run(session, 1)
    assert result.succeeded
    for name, w in combined_2.items():
        torch.testing.assert_close(w, first_weights[name] + second_weights[name], rtol=0, atol=0)
    assert state_equal(session.importance, combined_2)
    assert max(float(w.max()) for w in combined_2.values()) > 1.0      # stiffer than any single round


def test_a_failed_round_changes_neither_the_live_model_nor_the_session():
    session = _session(accumulation="sum")
    _run(session, 0)
    weights = {k: v.clone() for k, v in session.model.state_dict().items()}
    importance = {k: v.clone() for k, v in session.importance.items()}
    seed_before = session.generator().initial_seed()
    result, _ = _run(session, 1, config=fast_config(lr=1e-7, max_steps=1))
    assert result.outcome == "budget_exhausted"
    assert state_equal(session.model.state_dict(), weights)
    assert state_equal(session.importance, importance)
    assert session.rounds_applied == 1
    assert session.generator().initial_seed() == seed_before       # a retry draws the same randomness
    with pytest.raises(ValueError, match="refusing to commit a round that ended budget_exhausted"):
        session.commit(result, None)


def test_commit_false_leaves_the_session_until_the_caller_commits():
    session = _session()
    result, combined = _run(session, 0, commit=False)
    assert result.succeeded and session.rounds_applied == 0 and session.importance is None
    session.commit(result, combined)
    assert session.rounds_applied == 1
    assert state_equal(session.model.state_dict(), result.state)


def test_restore_rejects_a_model_with_other_parameters():
    tensors, meta = _session().state()
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    with pytest.raises(ValueError, match="do not match the model's parameters"):
        UnlearningSession.restore(other, tensors, meta)


def test_restore_rejects_importance_that_does_not_cover_the_model():
    session = _session()
    _run(session, 0)
    tensors, meta = session.state()
    dropped = next(k for k in tensors if k.startswith("importance/"))
    del tensors[dropped]
    with pytest.raises(ValueError, match="session importance do not match"):
        UnlearningSession.restore(tiny_model(), tensors, meta)


@pytest.mark.parametrize("version", [None, 0, 3, "1", "2"])
def test_restore_rejects_an_unknown_state_version(version):
    tensors, meta = _session().state()
    meta = {**meta, "state_version": version}
    with pytest.raises(ValueError, match="unsupported session state version"):
        UnlearningSession.restore(tiny_model(), tensors, meta)


def test_restore_rejects_a_model_whose_parameter_shapes_differ():
    tensors, meta = _session().state()
    ten_classes = build_model("mnist_cnn", num_classes=10, input_shape=INPUT_SHAPE, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="has shape"):
        UnlearningSession.restore(ten_classes, tensors, meta)


def test_a_session_on_a_partly_frozen_model_restores():
    def partly_frozen() -> nn.Module:
        model = tiny_model()
        next(model.parameters()).requires_grad_(False)
        return model

    session = _session(partly_frozen())
    result, _ = _run(session, 0)
    assert result.succeeded
    tensors, meta = session.state()
    fresh = partly_frozen()
    fresh.load_state_dict(session.model.state_dict())
    restored = UnlearningSession.restore(fresh, _bytes_roundtrip(tensors), meta)
    assert state_equal(restored.importance, session.importance)


@pytest.mark.parametrize("kwargs, match", [
    (dict(accumulation="mean"), "unknown accumulation 'mean'"),
    (dict(num_classes=1), "num_classes must be >= 2"),
])
def test_session_rejects_bad_settings(kwargs, match):
    kwargs = {"num_classes": NUM_CLASSES, **kwargs}
    with pytest.raises(ValueError, match=match):
        UnlearningSession(tiny_model(), **kwargs)


def test_session_rounds_validate_the_request_against_its_classes():
    x, _ = forget_set(2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        _session().run_round(ForgetRequest("forget", x, torch.tensor([0, 5])), method="neggrad")


# -- what the held examples keep, and what the memory keeps (session 7) ---------------------------------
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_held_targets_are_the_references_where_the_decision_is_unchanged():
    from daemon.engine.held import _held_targets

    reference = tiny_model()
    work = tiny_model()
    x = synthetic(8, seed=7)[0]
    ref = _logits(reference, x)
    head = next(m for m in reversed(list(work.modules())) if isinstance(m, nn.Linear))
    with torch.no_grad():      # raise class 2's logit by its median gap (some decisions change), lower class 0's
        head.bias[2] += float((ref.max(1).values - ref[:, 2]).median()) + 1e-3
        head.bias[0] -= 1.0
    cur = _logits(work, x)
    agree = ref.argmax(1) == cur.argmax(1)
    assert agree.any() and (~agree).any()
    labels = torch.zeros(x.shape[0], dtype=torch.long)          # every example made from a class-0 instance
    held, own = _held_targets(work, reference, x, labels)
    torch.testing.assert_close(own, cur, rtol=0, atol=0)
    # unchanged decisions: the reference's logits, except that label 0 gets no more than the model gives it
    torch.testing.assert_close(held[agree][:, 1:], ref[agree][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(held[agree][:, 0], cur[agree][:, 0], rtol=0, atol=0)
    assert bool((cur[agree][:, 0] < ref[agree][:, 0]).all())
    torch.testing.assert_close(held[~agree], cur[~agree], rtol=0, atol=0)           # changed ones: the model's
    other, _ = _held_targets(work, reference, x, torch.full_like(labels, 2))          # label 2 gained: reference's
    torch.testing.assert_close(other[agree][:, 2], ref[agree][:, 2], rtol=0, atol=0)
    for t in _held_targets(work, None, x, labels):
        torch.testing.assert_close(t, cur, rtol=0, atol=0)


def test_a_round_that_is_not_done_by_its_share_of_the_budget_holds_its_own_outputs():
    """Rounds 2 and later of near-duplicate instances (the synthetic classes are prototypes plus noise)
    fight the original outputs; past ``hold_original_share`` of the budget they fall back."""
    session = _session()
    outcomes = []
    for r in range(4):
        result, _ = _run(session, r, config=CONFIG.with_overrides(hold_original_share=0.5))
        outcomes.append(result)
    assert all(r.succeeded for r in outcomes)
    assert outcomes[0].held_fallback_step is None                     # round 1: reference = the model itself
    late = [r for r in outcomes[1:] if r.steps > 50]
    assert late and all(r.held_fallback_step == 50 for r in late)
    assert all(r.held_fallback_step is None for r in outcomes[1:] if r.steps <= 50)


def test_hold_at_original_changes_nothing_in_a_first_round_and_something_later():
    runs = {}
    for hold in ("original", "current"):
        session = _session()
        config = CONFIG.with_overrides(hold_at=hold)
        runs[hold] = [_run(session, r, config=config)[0] for r in range(2)]
    assert all(r.succeeded for rs in runs.values() for r in rs)
    assert state_equal(runs["original"][0].state, runs["current"][0].state)     # reference = model at round 1
    assert not state_equal(runs["original"][1].state, runs["current"][1].state)


def test_earlier_instances_stay_where_their_round_left_them():
    """The default memory keeps (all but 1e-5 of) each forgotten instance's input directions at every
    layer, so later rounds leave its logits as they were: it cannot relapse. Without the memory the
    same rounds move them."""
    moved = {}
    for energy in (None, 0.0):
        session = _session() if energy is None else _session(memory_energy=energy)
        first, _ = _run(session, 0)
        assert first.succeeded
        x0 = _request(0).x
        before = _logits(session.model, x0)
        for r in (1, 2):
            assert _run(session, r)[0].succeeded
        after = _logits(session.model, x0)
        moved[energy] = float((after - before).abs().max())
        if energy is None:
            assert torch.equal(after.argmax(1), before.argmax(1))
    assert moved[None] < 0.05 * moved[0.0]


def test_a_committed_class_round_becomes_the_reference_and_is_saved_and_undone():
    session = _session()
    assert session.reference is None
    assert state_equal(dict(session.reference_model().named_parameters()), session.original)
    x, y = forget_set(8, 40)
    cls = int(y[0])
    snap = session.snapshot()
    result, _ = session.run_round(ForgetRequest("forget_class", x[y == cls], y[y == cls], forget_class=cls),
                                  method="adv_imp", config=CONFIG, sentinel=_sentinel())
    assert result.succeeded and result.kind == "forget_class"
    live = {n: p.detach() for n, p in session.model.named_parameters()}
    assert state_equal(session.reference, live) and not state_equal(session.reference, session.original)
    assert state_equal({n: p.detach() for n, p in session.reference_model().named_parameters()}, live)
    tensors, meta = session.state()
    restored = UnlearningSession.restore(tiny_model(), _bytes_roundtrip(tensors), meta)
    assert state_equal(restored.reference, session.reference)
    bad = dict(tensors)
    bad[next(k for k in bad if k.startswith("reference/"))] = torch.zeros(3)
    with pytest.raises(ValueError, match="reference weights"):
        UnlearningSession.restore(tiny_model(), bad, meta)
    session.undo(snap)
    assert session.reference is None
    instance_round, _ = _run(session, 0)
    assert instance_round.succeeded and session.reference is None     # instance rounds keep the reference


def test_memory_copies_are_saved_and_older_states_keep_the_copies_they_ran_with():
    session = _session(memory_copies=3)
    tensors, meta = session.state()
    assert meta["memory_copies"] == 3
    assert UnlearningSession.restore(tiny_model(), tensors, meta).memory_copies == 3
    older = {k: v for k, v in meta.items() if k != "memory_copies"}
    assert UnlearningSession.restore(tiny_model(), tensors, older).memory_copies == 16
    assert _session().memory_copies == 0
    with pytest.raises(ValueError, match="memory_copies"):
        _session(memory_copies=-1)

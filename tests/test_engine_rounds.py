"""daemon.engine.rounds (with its requests, config and methods): outcomes, stopping rules, isolation, validation."""

from __future__ import annotations

import functools

import pytest
import torch

from daemon.engine.config import METHOD_SETTINGS, PRESETS, UnlearnConfig, preset
from daemon.engine.evaluate import predict
from daemon.engine.importance_plugin import ImportancePlugin
from daemon.engine.methods import METHODS, get_method
from daemon.engine.requests import ForgetRequest
from daemon.engine.rounds import OUTCOMES, run_round
from tests.engine_fixtures import (
    INPUT_SHAPE,
    NUM_CLASSES,
    fast_config,
    forget_set,
    state_equal,
    synthetic,
    tiny_model,
    train_data,
)

ROUND_METHODS = sorted(name for name, m in METHODS.items() if not m.oracle)


@functools.lru_cache(maxsize=None)
def _sentinel() -> torch.Tensor:
    """Held-out inputs of every class: a healthy model spreads them over the classes."""
    return synthetic(16, seed=1)[0]


def _round(model, request, method="neggrad", config=None, seed=0, **kw):
    m = get_method(method)
    kw.setdefault("sentinel", _sentinel())
    res = run_round(model, request, m, config or fast_config(lr=1e-3), generator=torch.Generator().manual_seed(seed),
                    num_classes=NUM_CLASSES, importance=ImportancePlugin("none"), **kw)
    assert res.outcome in OUTCOMES and res.succeeded == (res.outcome in ("forgotten", "relabelled"))
    return res


def _forget(n=4, start=8) -> ForgetRequest:
    x, y = forget_set(n, start)
    return ForgetRequest("forget", x, y)


# -- outcomes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ROUND_METHODS)
def test_every_method_forgets_a_few_instances_without_touching_the_callers_model(method):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    request = _forget()
    res = _round(model, request, method)
    assert res.outcome == "forgotten" and res.succeeded and res.reason is None
    assert res.method == method
    assert res.acc_forget == 0.0
    assert torch.equal(res.predictions_before, request.labels)
    assert not bool((res.predictions_after == request.labels).any())
    assert res.steps > 0
    assert min(res.attack_s, res.optimise_s, res.wall_s) >= 0
    assert res.wall_s >= res.attack_s + res.optimise_s - 1e-6
    expected_adv = 4 * res.config.adv_per_instance if METHODS[method].uses_adversarial else 0
    assert res.adversarial_examples == expected_adv
    expected_anchors = 4 * res.config.anchor_deform if METHODS[method].uses_adversarial else 0
    assert res.anchor_examples == expected_anchors
    assert state_equal(model.state_dict(), before)
    assert not model.training
    assert res.state.keys() == before.keys() and not state_equal(res.state, before)


def test_the_retrain_oracle_cannot_run_a_round():
    with pytest.raises(ValueError, match="retrain is a benchmark oracle"):
        run_round(tiny_model(), _forget(), METHODS["retrain"], fast_config(), generator=torch.Generator(),
                  num_classes=NUM_CLASSES)


def test_adv_imp_refuses_to_run_without_importance_weights():
    with pytest.raises(ValueError, match="adv_imp needs importance weights"):
        run_round(tiny_model(), _forget(), METHODS["adv_imp"], fast_config(), generator=torch.Generator(),
                  num_classes=NUM_CLASSES)


@pytest.mark.parametrize("method", ["neggrad", "adv_imp", "boundary_shrink"])
def test_a_relabel_round_puts_every_instance_on_its_target(method):
    x, y = forget_set(4, 8)
    targets = (y + 1) % NUM_CLASSES
    res = _round(tiny_model(), ForgetRequest("relabel", x, y, targets=targets), method)
    assert res.outcome == "relabelled" and res.succeeded
    assert res.acc_forget == 1.0
    assert torch.equal(res.predictions_after, targets)


def test_a_forget_class_round_stops_the_model_predicting_that_class_on_its_examples():
    x, y = train_data()
    cls = 1
    xs = x[y == cls][:4]
    request = ForgetRequest("forget_class", xs, torch.full((4,), cls), forget_class=cls)
    res = _round(tiny_model(), request, "neggrad")
    assert res.outcome == "forgotten" and res.acc_forget == 0.0
    assert not bool((res.predictions_after == cls).any())


def test_an_already_satisfied_request_succeeds_without_a_step():
    model = tiny_model()
    x, y = forget_set(4, 8)
    wrong = (y + 1) % NUM_CLASSES
    res = _round(model, ForgetRequest("relabel", x, wrong, targets=y), "neggrad")
    assert res.outcome == "relabelled" and res.steps == 0
    assert state_equal(res.state, model.state_dict())


@pytest.mark.parametrize("method", ["adv_imp", "random_label", "neggrad"])
def test_a_request_the_model_already_satisfies_prepares_nothing_for_steps_it_will_not_take(method):
    """No attack (adv_imp), no random targets (random_label), no noise sentinel (neggrad without one): the
    round draws nothing from its generator and makes no held examples."""
    model = tiny_model()
    x, _ = forget_set(8, 0)
    wrong = (predict(model, x) + 1) % NUM_CLASSES          # every instance already misclassified
    m = get_method(method)
    generator = torch.Generator().manual_seed(0)
    drawn_before = generator.get_state().clone()
    res = run_round(model, ForgetRequest("forget", x, wrong), m, fast_config(lr=1e-3), generator=generator,
                    num_classes=NUM_CLASSES, importance=ImportancePlugin("none"))
    assert res.outcome == "forgotten" and res.steps == 0
    assert res.adversarial_examples == res.anchor_examples == res.attack_example_iterations == 0
    assert torch.equal(generator.get_state(), drawn_before)
    assert state_equal(res.state, model.state_dict())
    # the same instances at their own labels: the round prepares and steps as before
    busy = _round(model, ForgetRequest("forget", x, predict(model, x)), method, fast_config(lr=1e-3))
    assert busy.steps > 0 and (busy.adversarial_examples > 0) == (method == "adv_imp")


def test_a_round_that_takes_no_step_is_never_called_collapsed():
    """The untouched model may already put mixed-label instances into one class; the round did not do that."""
    model = tiny_model()
    x, _ = train_data()
    pred = predict(model, x)
    top = int(torch.bincount(pred).argmax())
    pick = (pred == top).nonzero().squeeze(1)[:8]
    assert pick.numel() == 8
    labels = (top + 1 + torch.arange(8) % (NUM_CLASSES - 1)) % NUM_CLASSES   # mixed, never the predicted class
    res = _round(model, ForgetRequest("forget", x[pick], labels), "neggrad", sentinel=None)
    assert res.outcome == "forgotten" and res.steps == 0


def test_a_one_step_budget_ends_budget_exhausted_never_forgotten():
    res = _round(tiny_model(), _forget(), "neggrad", fast_config(lr=1e-6, max_steps=1))
    assert res.outcome == "budget_exhausted" and not res.succeeded
    assert res.steps == 1
    assert res.acc_forget > 0
    assert "step budget of 1" in res.reason


def test_the_calibrated_stop_ends_earlier_than_the_zero_rule_at_or_below_its_level():
    request = _forget(8, 8)
    zero = _round(tiny_model(), request, "neggrad", fast_config(lr=1e-3))
    calibrated = _round(tiny_model(), request, "neggrad", fast_config(lr=1e-3, stop="calibrated", stop_level=0.5))
    assert zero.outcome == calibrated.outcome == "forgotten"
    assert zero.acc_forget == 0.0
    assert 0.0 < calibrated.acc_forget <= 0.5
    assert 0 < calibrated.steps < zero.steps


HUGE_LR = dict(lr=1e6, optimizer="sgd", forget_loss="neg_ce", grad_clip=None, mask_forgotten=False)


@pytest.mark.parametrize("method, sentinel", [("adv_imp", None), ("adv", None), ("neggrad", "held-out")])
def test_a_huge_learning_rate_ends_diverged_or_collapsed_never_success(method, sentinel):
    kw = {"sentinel": _sentinel() if sentinel else None}
    res = _round(tiny_model(), _forget(8), method, fast_config(**HUGE_LR), **kw)
    assert res.outcome in ("diverged", "collapsed"), res.outcome
    assert not res.succeeded and res.reason


def test_a_huge_learning_rate_without_a_sentinel_is_not_reported_forgotten():
    res = _round(tiny_model(), _forget(8), "neggrad", fast_config(**HUGE_LR), sentinel=None)
    wrecked = tiny_model()
    wrecked.load_state_dict(res.state)
    held_out = predict(wrecked, _sentinel())
    # the published model answers one class for every held-out input (and for all 8 forget instances)
    assert int(torch.bincount(held_out).max()) == held_out.numel()
    assert res.outcome in ("diverged", "collapsed"), res.outcome


def test_should_abort_stops_the_round_as_aborted_and_progress_sees_every_step():
    polls, seen = [], []

    def abort_on_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    res = _round(tiny_model(), _forget(), "neggrad", fast_config(lr=1e-6),
                 should_abort=abort_on_third_poll, progress=lambda s, total, acc: seen.append((s, total)))
    assert res.outcome == "aborted" and not res.succeeded
    assert res.steps == 2
    assert seen == [(1, 100), (2, 100)]


def test_an_immediate_abort_takes_no_step_and_returns_the_original_weights():
    model = tiny_model()
    res = _round(model, _forget(), "neggrad", should_abort=lambda: True)
    assert res.outcome == "aborted" and res.steps == 0
    assert state_equal(res.state, model.state_dict())


@pytest.mark.parametrize("method", ["adv_imp", "random_label"])
def test_the_same_generator_seed_reproduces_the_round_exactly(method):
    request = _forget()
    a = _round(tiny_model(), request, method, seed=3)
    b = _round(tiny_model(), request, method, seed=3)
    assert a.steps == b.steps and a.outcome == b.outcome
    assert state_equal(a.state, b.state)


def test_the_trajectory_records_forget_and_tracked_accuracy():
    xt, yt = synthetic(4, seed=2)
    res = _round(tiny_model(), _forget(8, 8), "neggrad", track=(xt, yt), track_every=2)
    steps = [p.step for p in res.trajectory]
    assert steps[0] == 0 and steps[-1] == res.steps and steps == sorted(steps)
    assert res.trajectory[0].acc_forget == 1.0 and res.trajectory[-1].acc_forget == 0.0
    assert all(0.0 <= p.acc_track <= 1.0 for p in res.trajectory)
    # the benchmark's evaluations are timed apart from the round's own work
    assert res.tracking_s > 0 and res.wall_s >= res.attack_s + res.optimise_s - 1e-6
    plain = _round(tiny_model(), _forget(8, 8), "neggrad")
    assert plain.tracking_s == 0.0


# -- ForgetRequest.validate ----------------------------------------------------------------------------

X4 = torch.rand(4, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
Y4 = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("request_, match", [
    (ForgetRequest("erase", X4, Y4), "unknown kind 'erase'"),
    (ForgetRequest("forget", X4[:0], Y4[:0]), "the forget set is empty"),
    (ForgetRequest("forget", X4[:, :, :4], Y4), "instances must have shape N×1×8×8"),
    (ForgetRequest("forget", X4[0], Y4), "instances must have shape"),
    (ForgetRequest("forget", X4 * 2, Y4), r"instance values must lie in \[0, 1\]"),
    (ForgetRequest("forget", X4.clone().fill_(float("nan")), Y4), "finite floating-point"),
    (ForgetRequest("forget", (X4 * 255).to(torch.uint8), Y4), "finite floating-point"),
    (ForgetRequest("forget", X4, Y4[:3]), "one label per instance"),
    (ForgetRequest("forget", X4, torch.tensor([0, 1, 2, 4])), r"labels must lie in \[0, 3\], got 0..4"),
    (ForgetRequest("forget", X4, torch.tensor([-1, 1, 2, 3])), r"labels must lie in \[0, 3\]"),
    (ForgetRequest("forget", X4, Y4.float()), "labels must be integers"),
    (ForgetRequest("relabel", X4, Y4), "relabel needs one target per instance"),
    (ForgetRequest("relabel", X4, Y4, targets=Y4[:2]), "relabel needs one target per instance"),
    (ForgetRequest("relabel", X4, Y4, targets=torch.tensor([1, 2, 3, 3])), "must differ from the instance's label"),
    (ForgetRequest("relabel", X4, Y4, targets=torch.tensor([1, 2, 3, 9])), r"targets must lie in \[0, 3\]"),
    (ForgetRequest("forget", X4, Y4, targets=Y4), "targets are only for relabel"),
    (ForgetRequest("forget_class", X4, Y4), r"forget_class needs a class in \[0, 3\], got None"),
    (ForgetRequest("forget_class", X4, torch.full((4,), 2), forget_class=4), "got 4"),
    (ForgetRequest("forget_class", X4, Y4, forget_class=2), "must carry that class"),
    (ForgetRequest("forget", X4, Y4, forget_class=2), "forget_class is only for kind forget_class"),
])
def test_invalid_requests_are_rejected_with_the_reason(request_, match):
    with pytest.raises(ValueError, match=match):
        request_.validate(num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE)


@pytest.mark.parametrize("request_", [
    ForgetRequest("forget", X4, Y4),
    ForgetRequest("relabel", X4, Y4, targets=(Y4 + 1) % 4),
    ForgetRequest("forget_class", X4, torch.full((4,), 2), forget_class=2),
])
def test_valid_requests_pass_silently(request_):
    assert request_.validate(num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE) is None
    assert len(request_) == 4


def test_run_round_validates_the_request_before_any_work():
    bad = ForgetRequest("forget", X4, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="labels must lie"):
        _round(tiny_model(), bad, "neggrad")


# -- UnlearnConfig and presets ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="rmsprop"), "optimizer must be one of sgd, adam, got 'rmsprop'"),
    (dict(forget_loss="hinge"), "forget_loss must be one of"),
    (dict(adv_loss="mse"), "adv_loss must be one of"),
    (dict(stop="never"), "stop must be one of"),
    (dict(pgd_eps=0.0), "pgd_eps must be > 0, got 0.0"),
    (dict(pgd_step=-0.1), "pgd_step must be > 0"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(lr=float("nan")), "lr must be > 0"),
    (dict(pgd_iterations=0), "pgd_iterations must be >= 1"),
    (dict(attack_batch=0), "attack_batch must be >= 1"),
    (dict(adv_batch=0), "adv_batch must be >= 1"),
    (dict(max_steps=0), "max_steps must be >= 1"),
    (dict(check_every=0), "check_every must be >= 1"),
    (dict(adv_per_instance=-1), "adv_per_instance must be >= 0"),
    (dict(momentum=-0.5), "momentum must be >= 0"),
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(lam=-1.0), "lam must be >= 0"),
    (dict(forget_margin=-1.0), "forget_margin must be >= 0"),
    (dict(grad_clip=0.0), "grad_clip must be > 0 or None"),
    (dict(adv_weight=-1.0), "adv_weight must be >= 0 or None"),
    (dict(stop_level=1.0), r"stop_level must lie in \[0, 1\)"),
    (dict(stop_level=-0.1), r"stop_level must lie in \[0, 1\)"),
    (dict(collapse_share=0.0), r"collapse_share must lie in \(0, 1\]"),
    (dict(collapse_share=1.5), r"collapse_share must lie in \(0, 1\]"),
    (dict(hold_original_share=0.0), r"hold_original_share must lie in \(0, 1\]"),
    (dict(hold_original_share=1.5), r"hold_original_share must lie in \(0, 1\]"),
    (dict(hold_at="previous"), "hold_at must be one of original, current"),
    (dict(lr="fast"), "lr must be a number, got 'fast'"),
    (dict(pgd_eps=True), "pgd_eps must be a number, got True"),
    (dict(max_steps=80.5), "max_steps must be an integer, got 80.5"),
    (dict(mask_forgotten=1), "mask_forgotten must be true or false, got 1"),
    (dict(grad_clip="x"), "grad_clip must be a number or None, got 'x'"),
    (dict(stop=0), "stop must be a string, got 0"),
])
def test_config_rejects_bad_values_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearnConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        UnlearnConfig().with_overrides(**kwargs)


def test_with_overrides_rejects_unknown_names_and_copies_the_rest():
    base = UnlearnConfig()
    with pytest.raises(ValueError, match="unknown unlearning setting.*: learning_rate, steps"):
        base.with_overrides(steps=3, learning_rate=0.1)
    changed = base.with_overrides(lr=0.5, max_steps=7)
    assert (changed.lr, changed.max_steps) == (0.5, 7)
    assert (base.lr, base.max_steps) == (UnlearnConfig.lr, UnlearnConfig.max_steps)
    assert changed.to_dict() == {**base.to_dict(), "lr": 0.5, "max_steps": 7}


def test_the_paper_and_default_presets_exist_and_unknown_presets_are_rejected():
    assert preset("default") == UnlearnConfig()
    paper = preset("paper")
    assert paper is PRESETS["paper"]
    assert (paper.forget_loss, paper.adv_loss, paper.adv_weight, paper.optimizer) == ("neg_ce", "ce", None, "sgd")
    assert (paper.pgd_eps, paper.pgd_step, paper.pgd_iterations, paper.adv_per_instance) == (4.0, 0.1, 100, 20)
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.lam, paper.stop) == (1e-3, 0.9, 1e-4, 1.0, "zero")
    assert not paper.mask_forgotten and paper.bn_train and paper.grad_clip is None
    with pytest.raises(ValueError, match="unknown preset 'fast'; known: default, paper"):
        preset("fast")


def test_a_preset_gives_a_baseline_its_own_step_size_in_instance_rounds_only():
    base = preset("default")
    for kind in ("forget", "relabel"):
        assert preset("default", "neggrad", kind) == base.with_overrides(lr=1e-5)
        assert preset("default", "random_label", kind).lr == 3e-5
        assert preset("default", "boundary_shrink", kind).lr == 3e-5
        assert preset("default", "adv_imp", kind) == base          # the paper's method keeps the shared step
        assert preset("default", "adv", kind) == base
    for method in ("neggrad", "random_label", "boundary_shrink"):
        assert preset("default", method, "forget_class") == base   # class rounds move one row at the shared step
        assert preset("paper", method, "forget") is PRESETS["paper"]
    for settings in METHOD_SETTINGS.values():
        for s in settings:
            get_method(s.method)
            assert set(s.kinds) <= {"forget", "relabel", "forget_class"}
            assert set(s.overrides) == {"lr"}, "only the step size may differ between methods"
            assert s.why


def test_get_method_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="unknown method 'scrub'"):
        get_method("scrub")


class _OneClass(torch.nn.Module):
    """Predicts class 0 for everything: what a collapsed model does."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], NUM_CLASSES) + self.w
        out[:, 0] = 1.0
        return out


def test_forget_set_collapse_is_detected_only_for_mixed_labels():
    from daemon.engine.rounds import _forget_set_collapsed

    x = torch.rand(8, *INPUT_SHAPE)
    mixed = ForgetRequest("forget", x, torch.tensor([1, 2, 3, 1, 2, 3, 1, 2]))
    same = ForgetRequest("forget", x, torch.full((8,), 2))
    assert _forget_set_collapsed(_OneClass(), mixed, 0.9)
    assert not _forget_set_collapsed(_OneClass(), same, 0.9)
    assert not _forget_set_collapsed(_OneClass(), ForgetRequest("forget", x[:4], mixed.labels[:4]), 0.9)


def test_should_abort_also_stops_the_attack_phase():
    polls = []

    def abort_during_attack() -> bool:
        polls.append(1)
        return len(polls) >= 2          # the attack polls first: stop it on its second iteration

    res = _round(tiny_model(), _forget(), "adv", fast_config(), should_abort=abort_during_attack)
    assert res.outcome == "aborted" and res.steps == 0
    assert res.adversarial_examples == 0

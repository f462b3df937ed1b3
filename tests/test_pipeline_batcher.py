"""The batcher and the offset book: pure bookkeeping, tested without a broker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from daemon.pipeline.batcher import Batcher
from daemon.pipeline.offsets import OffsetBook
from daemon.pipeline.pending import PendingRequest


def _pending(rid: str, size: int = 1, *, kind: str = "forget", forget_class: int | None = None, model: str = "m",
             partition: int = 0, offset: int = 0, goal: str | None = None) -> PendingRequest:
    decoded = SimpleNamespace(request_id=rid, model=model, kind=kind, forget_class=forget_class,
                              instances=[object()] * size, goal=goal)
    return PendingRequest(decoded=decoded, topic="t", partition=partition, offset=offset, received_at=0.0,
                          labels=[0] * size, targets=None)


def _ids(batch) -> list[str]:
    return [p.request_id for p in batch]


def test_a_round_is_due_when_it_is_full_or_its_oldest_request_waited_long_enough():
    b = Batcher(max_instances=4, max_wait_s=2.0)
    b.add(_pending("a", 2), now=10.0)
    assert b.next_due(now=11.0) is None                         # half full, waited 1 s
    assert _ids(b.next_due(now=12.0)) == ["a"]                  # waited 2 s
    assert _ids(b.running) == ["a"] and _ids(b.waiting()) == ["a"]
    assert _ids(b.settle()) == ["a"] and list(b.waiting()) == []
    b.add(_pending("b", 3), now=20.0)
    b.add(_pending("c", 1), now=20.0)
    assert _ids(b.next_due(now=20.0)) == ["b", "c"]            # full at once


def test_a_round_takes_the_oldest_requests_group_up_to_the_instance_limit():
    b = Batcher(max_instances=3, max_wait_s=0.0)
    for p in (_pending("f1", 2), _pending("c1", kind="forget_class", forget_class=3), _pending("f2", 1),
              _pending("f3", 1), _pending("c2", kind="forget_class", forget_class=4)):
        b.add(p, now=0.0)
    assert _ids(b.next_due(now=1.0)) == ["f1", "f2"]             # f3 would pass 3 instances
    b.settle()
    assert _ids(b.next_due(now=1.0)) == ["c1"]                   # class 3 and class 4 do not share a round
    b.settle()
    assert _ids(b.next_due(now=1.0)) == ["f3"]
    b.settle()
    assert _ids(b.next_due(now=1.0)) == ["c2"]
    b.settle()
    assert b.next_due(now=1.0) is None


def test_requests_of_different_goals_never_share_a_round():
    """A round has one stopping rule: unseen and misclassify requests (and those leaving it to the model's default)
    run apart, each group in order."""
    b = Batcher(max_instances=8, max_wait_s=0.0)
    for p in (_pending("u1", goal="unseen"), _pending("d1"), _pending("m1", goal="misclassify"),
              _pending("u2", goal="unseen"), _pending("d2")):
        b.add(p, now=0.0)
    rounds = []
    while (batch := b.next_due(now=1.0)) is not None:
        rounds.append(_ids(batch))
        b.settle()
    assert rounds == [["u1", "u2"], ["d1", "d2"], ["m1"]]


def test_a_single_request_larger_than_the_limit_still_runs_alone():
    b = Batcher(max_instances=2, max_wait_s=0.0)
    b.add(_pending("big", 5), now=0.0)
    assert _ids(b.next_due(now=0.0)) == ["big"]


def test_the_halves_of_a_failed_round_run_first_and_an_aborted_round_goes_back_in_front():
    b = Batcher(max_instances=10, max_wait_s=0.0)
    for rid in ("a", "b", "c"):
        b.add(_pending(rid), now=0.0)
    batch = b.next_due(now=0.0)
    b.add(_pending("late"), now=1.0)
    b.split(b.settle())
    assert _ids(b.next_due(now=2.0)) == ["a", "b"]               # the larger half first
    assert _ids(b.waiting()) == ["late", "c", "a", "b"]
    b.settle()
    assert _ids(b.next_due(now=2.0)) == ["c"]
    b.retry(b.settle(), now=3.0)                                 # aborted: back in front of "late"
    assert _ids(b.next_due(now=3.0)) == ["c", "late"]
    assert len(batch) == 3


def test_a_held_model_runs_nothing_until_released_while_other_models_go_on():
    b = Batcher(max_instances=1, max_wait_s=0.0)
    b.add(_pending("a", model="m"), now=0.0)
    b.add(_pending("x", model="n"), now=0.0)
    b.split([_pending("h1", model="m"), _pending("h2", model="m")])
    b.held.add("m")                                     # a deferred round waits for m's rebase
    assert _ids(b.next_due(now=1.0)) == ["x"]
    assert b.next_due(now=2.0) is None
    assert {p.request_id for p in b.waiting()} >= {"a", "h1", "h2"}     # still waiting, none lost
    b.held.discard("m")
    assert _ids(b.next_due(now=3.0)) == ["h1"]


def test_revoked_partitions_take_their_waiting_requests_with_them():
    b = Batcher(max_instances=10, max_wait_s=100.0)
    b.add(_pending("p0", partition=0), now=0.0)
    b.add(_pending("p1", partition=1), now=0.0)
    b.split([_pending("h0", partition=0), _pending("h1", partition=1)])
    b.drop({TopicPartition("t", 0)})
    assert sorted(_ids(b.waiting())) == ["h1", "p1"]
    assert b.is_waiting("p1") and not b.is_waiting("p0")
    b.drop({TopicPartition("t", 1)})
    assert list(b.waiting()) == [] and b.first_pending_at == {}


def test_the_batcher_refuses_an_empty_round_limit():
    with pytest.raises(ValueError, match="max_instances must be >= 1"):
        Batcher(max_instances=0, max_wait_s=1.0)


def test_offsets_never_move_past_a_request_in_flight():
    book = OffsetBook()
    tp, other = TopicPartition("t", 0), TopicPartition("t", 1)
    for off in range(5):
        book.read(tp, off)
    book.hold(tp, 2)
    book.hold(tp, 4)
    book.read(other, 7)
    assert book.safe() == {tp: 2, other: 8}
    assert book.to_commit([tp]) == {tp: 2}                       # only assigned partitions
    book.mark_committed({tp: 2, other: 8})
    assert book.to_commit([tp, other]) == {}                     # nothing moved
    book.release(tp, 2)
    assert book.to_commit([tp, other]) == {tp: 4}
    book.release(tp, 4)
    assert book.safe()[tp] == 5
    assert book.lag(tp, 9) == 4 and book.lag(tp, None) is None and book.lag(TopicPartition("t", 9), 3) is None
    book.forget([tp])
    assert book.safe() == {other: 8} and book.to_commit([tp, other]) == {}

"""OffsetTracker: commit only up to the lowest unfinished offset, never backwards."""

import pytest

from shared.offsets import OffsetTracker

P, Q = ("image.requested", 0), ("image.requested", 1)


def offsets(tracker: OffsetTracker, partitions=None) -> dict:
    return {(tp.topic, tp.partition): tp.offset for tp in tracker.committable(partitions)}


def test_out_of_order_completion_commits_up_to_the_lowest_unfinished_offset():
    tracker = OffsetTracker()
    epochs = {offset: tracker.start(P, offset) for offset in (10, 11, 12, 13)}
    assert offsets(tracker) == {}  # nothing finished: the committed position stays at 10
    tracker.finish(P, 12, epochs[12])
    tracker.finish(P, 11, epochs[11])
    assert offsets(tracker) == {}  # 10 is still open
    tracker.finish(P, 10, epochs[10])
    assert offsets(tracker) == {P: 13}  # 13 is still open
    tracker.finish(P, 13, epochs[13])
    assert offsets(tracker) == {P: 14}
    assert offsets(tracker) == {}  # handed out once


def test_partitions_are_independent():
    tracker = OffsetTracker()
    p_epoch, q_epoch = tracker.start(P, 0), tracker.start(Q, 5)
    tracker.finish(Q, 5, q_epoch)
    assert offsets(tracker) == {Q: 6}
    tracker.finish(P, 0, p_epoch)
    assert offsets(tracker, [P]) == {P: 1}


def test_it_refuses_to_go_backwards():
    tracker = OffsetTracker()
    tracker.start(P, 7)
    with pytest.raises(ValueError):
        tracker.start(P, 6)


def test_work_from_before_a_revocation_does_not_finish_the_new_assignments_offsets():
    tracker = OffsetTracker()
    old_epoch = tracker.start(P, 3)
    tracker.forget([P])  # revoked; then assigned again, from the committed offset 3
    new_epoch = tracker.start(P, 3)
    tracker.finish(P, 3, old_epoch)  # the old work finishing must not count for the new
    assert tracker.is_open(P, 3, new_epoch) and not tracker.is_open(P, 3, old_epoch)
    assert offsets(tracker) == {}
    tracker.finish(P, 3, new_epoch)
    assert offsets(tracker) == {P: 4}

"""The processor's ByteBudget: downloads read their bodies only while the bytes fit, with real threads."""

import threading
import time

from services.processor.pipeline import UNKNOWN_SIZE_BYTES, ByteBudget, Reservation
from services.processor.priority import BULK, NORMAL

SETTLE_SECONDS = 0.2  # long enough for a thread that could go on to have gone on


def reserve_in_thread(budget: ByteBudget, count: int, priority: int = NORMAL) -> threading.Event:
    done = threading.Event()

    def reserve():
        budget.reserve(count, priority)
        done.set()

    threading.Thread(target=reserve, daemon=True).start()
    return done


def test_a_body_that_does_not_fit_waits_until_enough_is_released():
    budget = ByteBudget(limit=10)
    budget.reserve(6, NORMAL)
    second = reserve_in_thread(budget, 5)
    assert not second.wait(SETTLE_SECONDS)
    budget.release(2)  # 4 + 5 fit under 10
    assert second.wait(5)
    assert budget.held == 9


def test_an_image_larger_than_the_limit_goes_alone():
    budget = ByteBudget(limit=10)
    budget.reserve(25, NORMAL)  # nothing held: it must not wait forever
    small = reserve_in_thread(budget, 1)
    assert not small.wait(SETTLE_SECONDS)
    budget.release(25)
    assert small.wait(5)


def test_waiting_normal_images_go_before_bulk_ones():
    budget = ByteBudget(limit=10)
    budget.reserve(10, NORMAL)
    bulk = reserve_in_thread(budget, 4, BULK)
    time.sleep(SETTLE_SECONDS)
    normal = reserve_in_thread(budget, 8, NORMAL)
    time.sleep(SETTLE_SECONDS)
    budget.release(10)
    assert normal.wait(5)
    assert not bulk.wait(SETTLE_SECONDS)  # 8 + 4 do not fit: bulk waits for the normal image's bytes
    budget.release(8)
    assert bulk.wait(5)


def test_a_reservation_holds_the_declared_size_then_the_real_one_and_gives_all_back():
    budget = ByteBudget(limit=100)
    with Reservation(budget, NORMAL) as reservation:
        reservation.body_size(None)  # no Content-Length
        assert budget.held == UNKNOWN_SIZE_BYTES
        reservation.resize(40)
        assert budget.held == 40
    assert budget.held == 0


def test_a_smaller_body_than_reserved_lets_a_waiting_download_go():
    budget = ByteBudget(limit=10)
    with Reservation(budget, NORMAL) as reservation:
        reservation.body_size(9)
        waiting = reserve_in_thread(budget, 5)
        assert not waiting.wait(SETTLE_SECONDS)
        reservation.resize(3)  # the server sent less than it declared
        assert waiting.wait(5)

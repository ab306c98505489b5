"""The dispatcher's two rules on their own: who gets the window's free places (and in which lane), and
how large the window is, from what the processors finish."""

import uuid

from services.api.fair_share import JobDemand, Release, allocate, shares
from services.api.window import Window


def job(client=None, weight=1.0, held=0, waiting=1000, released=None) -> JobDemand:
    return JobDemand(uuid.uuid4(), client, weight, held, waiting, held if released is None else released)


def test_clients_share_by_weight_then_their_jobs_equally():
    a1, a2, b, c = job("a"), job("a"), job("b", weight=2), job(None, waiting=0, held=0)
    assert shares([a1, a2, b, c]) == {a1.job_id: 1 / 6, a2.job_id: 1 / 6, b.job_id: 2 / 3}  # c is not active


def test_free_places_go_to_whoever_holds_least_per_weight():
    a1, a2, b = job("a", held=10), job("a", held=10), job("b", held=0)
    plan = allocate([a1, a2, b], window=40, places=20)
    assert {j: r.total for j, r in plan.items()} == {b.job_id: 20}  # b catches up with a's 20 first
    plan = allocate([a1, a2, b], window=80, places=40)  # then the rest is shared: 10 to b, 5 to each of a's
    assert plan[b.job_id].total == 30 and plan[a1.job_id].total == 5 and plan[a2.job_id].total == 5


def test_no_job_gets_more_than_it_has_waiting_and_the_rest_goes_to_the_others():
    small, large = job(waiting=3), job(waiting=1000)
    plan = allocate([small, large], window=100, places=50)
    assert plan[small.job_id].total == 3 and plan[large.job_id].total == 47


def test_a_new_jobs_first_images_pass_the_queue_and_a_job_alone_does_not():
    alone = job(waiting=10_000)
    assert allocate([alone], window=64, places=64) == {alone.job_id: Release(priority=0, queued=64)}

    incumbent, newcomer = job(held=64, released=64), job(waiting=100)
    plan = allocate([incumbent, newcomer], window=64, places=40)
    # its share of the window (32 of 64) passes the incumbent's queue, the rest queues behind it
    assert plan == {newcomer.job_id: Release(priority=32, queued=8)}

    # Only a job's first images: one that had its first ones released queues, however few it holds
    # (images in the priority lane finish sooner; by what it holds, it would keep the lane for itself).
    started = [job(held=31, released=40), job(held=2, released=32)]
    assert all(r.priority == 0 for r in allocate(started, window=64, places=8).values())


def test_the_window_opens_while_it_limits_the_processors_and_closes_when_they_slow():
    window = Window(seconds=2, minimum=10, maximum=1000)
    assert window.size == 10
    now, held = 0.0, 0
    for _ in range(200):  # processors that finish whatever is held every 0.1 s (much faster than 2 s)
        released = window.size - held
        now += 0.1
        window.observe(now, 0, released)
        held = 0
    assert window.size == 1000  # opened to its maximum
    for _ in range(300):  # now they finish 20 images a second, each replaced
        now += 0.1
        window.observe(now, held=500, released_since=2)
    assert 38 <= window.size <= 42  # 20/s for 2 s
    for _ in range(300):  # and then nothing at all
        now += 0.1
        window.observe(now, held=500, released_since=0)
    assert window.size == 10


def test_an_idle_spell_keeps_the_pace_measured_before_it():
    window = Window(seconds=2, minimum=10, maximum=1000)
    window.observe(0.0, held=0, released_since=0)
    for step in range(1, 100):
        window.observe(step * 0.1, held=50, released_since=5)  # 50 images a second
    for held in range(45, -5, -5):  # the last ones finish at the same pace
        step += 1
        window.observe(step * 0.1, held=held, released_since=0)
    assert window.size == 100
    for later in range(step + 1, step + 300):
        window.observe(later * 0.1, held=0, released_since=0)  # nothing held: nothing to learn
    assert window.size == 100


def test_a_job_not_started_gets_its_first_image_beyond_a_full_window_and_no_more():
    incumbent, fresh, started = job(held=64, released=64), job(waiting=5), job(held=0, released=3, waiting=5)
    plan = allocate([incumbent, fresh, started], window=64, places=0, starting_places=4)
    assert plan == {fresh.job_id: Release(priority=1)}  # one image each, only jobs with none out yet

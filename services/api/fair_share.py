"""Who gets the next images released into Kafka: clients share the window by weight, then the jobs of
one client share their client's part equally.

Each free place in the window goes to the client holding the fewest images released and not finished
per unit of weight, and within that client to the job holding the fewest; ties go to whoever was served
least recently (round robin). Images spend about the same time in the processors whoever sent them, so
holding places in proportion is finishing images in proportion; a job whose images are slow (a host
that never answers) holds its places longer and gets no more, so it cannot crowd the others out.

The lane of a released image: a job's first images, as many as its fair share of the window, go to the
priority lane, which the processors take first, so that a job that just arrived does not
queue behind what the others already hold (a job alone has nobody to pass: its images queue). Every
later image queues in the bulk lane like everyone's. It is counted by the images a job has ever had
released, not by what it holds: images in the priority lane finish sooner, and a rule by what a job
holds would keep giving it the priority lane, starving the bulk lane (measured: 95 % of the images to
the prioritised client instead of 75 %). A client with many jobs has small shares per job, so a flood
of small jobs gets few images through the priority lane. Pure: no I/O, so it is tested on its own.
"""

import heapq
import itertools
import math
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

PRIORITY_PART_OF_SHARE = 1.0  # a job's first images, up to this part of its share of the window, pass the queue


@dataclass(frozen=True)
class JobDemand:
    job_id: uuid.UUID
    client: Hashable  # the API key's id; None for every job without a key (one client)
    weight: float  # the client's
    held: int  # images released and not finished
    waiting: int  # images not released yet
    released: int = 0  # images released so far (finished or not)


@dataclass
class Release:
    priority: int = 0  # images for the priority lane, released first
    queued: int = 0  # then images for the bulk lane

    @property
    def total(self) -> int:
        return self.priority + self.queued


def share(client_weight: float, active_weight: float, client_jobs: int) -> float:
    """A job's fair share (0-1): its client's weight over the weights of the clients with active jobs,
    split equally among the client's active jobs. Active: holding or waiting images."""
    return client_weight / active_weight / client_jobs


def shares(jobs: Sequence[JobDemand]) -> dict[uuid.UUID, float]:
    """Each active job's fair share of the window."""
    active = [job for job in jobs if job.held > 0 or job.waiting > 0]
    weights = {job.client: job.weight for job in active}
    active_weight = sum(weights.values())
    jobs_of_client: dict = {}
    for job in active:
        jobs_of_client[job.client] = jobs_of_client.get(job.client, 0) + 1
    return {job.job_id: share(weights[job.client], active_weight, jobs_of_client[job.client]) for job in active}


def allocate(jobs: Sequence[JobDemand], window: int, places: int, starting_places: int = 0) -> dict[uuid.UUID, Release]:
    """How many images of each job to release into `places` free places of a window of `window` images,
    and `starting_places` more kept for the first image of jobs with none released yet (so that a new
    job starts at once, even when the window is full). `jobs` in the order they were created: among
    equals, the older goes first."""
    share_of = shares(jobs)
    held = {job.job_id: job.held for job in jobs}
    held_by_all = sum(held.values())
    waiting = {job.job_id: job.waiting for job in jobs}
    released = {job.job_id: job.released for job in jobs}
    releases: dict[uuid.UUID, Release] = {}
    for job in jobs:
        if starting_places > 0 and released[job.job_id] == 0 and waiting[job.job_id] > 0:
            first = releases.setdefault(job.job_id, Release())
            if held_by_all > 0:
                first.priority += 1
            else:
                first.queued += 1
            held[job.job_id] += 1
            held_by_all += 1
            waiting[job.job_id] -= 1
            released[job.job_id] += 1
            starting_places -= 1
    served = itertools.count()
    clients: dict[Hashable, _Client] = {}
    for job in jobs:
        if waiting[job.job_id] > 0:
            client = clients.setdefault(job.client, _Client(job.weight, next(served)))
            client.held += held[job.job_id]
            heapq.heappush(client.jobs, (held[job.job_id], next(served), job.job_id))
    for job in jobs:  # what a client holds counts jobs with nothing left to release too
        if waiting[job.job_id] == 0 and job.client in clients:
            clients[job.client].held += held[job.job_id]
    ready = [(client.load(), client.last_served, key) for key, client in clients.items()]
    heapq.heapify(ready)
    while places > 0 and ready:
        _, _, key = heapq.heappop(ready)
        client = clients[key]
        _, _, job_id = heapq.heappop(client.jobs)
        release = releases.setdefault(job_id, Release())
        first_images_left = math.floor(PRIORITY_PART_OF_SHARE * share_of[job_id] * window) - released[job_id]
        others_hold = held_by_all > held[job_id]
        if not ready and not client.jobs:  # the only job left: the rest at once (a large job alone)
            images = min(places, waiting[job_id])
            priority = max(0, min(images, first_images_left)) if others_hold else 0
            release.priority += priority
            release.queued += images - priority
            break
        if first_images_left >= 1 and others_hold:
            release.priority += 1
        else:
            release.queued += 1
        held[job_id] += 1
        released[job_id] += 1
        held_by_all += 1
        waiting[job_id] -= 1
        client.held += 1
        places -= 1
        client.last_served = next(served)
        if waiting[job_id] > 0:
            heapq.heappush(client.jobs, (held[job_id], client.last_served, job_id))
        if client.jobs:
            heapq.heappush(ready, (client.load(), client.last_served, key))
    return releases


@dataclass
class _Client:
    weight: float
    last_served: int
    held: int = 0
    jobs: list = field(default_factory=list)  # heap of (held, last served, job id) of its jobs with images waiting

    def load(self) -> float:
        """What the client would hold per unit of weight with one more image."""
        return (self.held + 1) / self.weight

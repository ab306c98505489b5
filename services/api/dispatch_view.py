"""What GET /status says about a job's place in the release of images (services/api/dispatcher.py):
how many are out and waiting, its fair share of the processors now, and estimates from the pace the
leading dispatcher last measured (dispatcher_state)."""

from collections.abc import Mapping

from psycopg import Connection
from psycopg.rows import DictRow

from services.api.fair_share import share

# The clients with active jobs (holding or waiting images), their weights and active jobs.
ACTIVE_CLIENTS = """
SELECT j.owner_key_id AS client, coalesce(k.weight, 1) AS weight, count(*) AS jobs
FROM processing_jobs j LEFT JOIN api_keys k ON k.id = j.owner_key_id
WHERE j.status <> 'completed'
  AND (j.released_images < j.total_images OR j.released_images > j.processed_images + j.failed_images)
GROUP BY j.owner_key_id, k.weight
"""

STATE = "SELECT window_images, images_per_second FROM dispatcher_state"


def dispatch_view(conn: Connection[DictRow], job: Mapping) -> dict:
    """job: its processing_jobs row."""
    finished = job["processed_images"] + job["failed_images"]
    view = {
        "released": job["released_images"],
        "waiting": job["total_images"] - job["released_images"],
        "share": None,
        "started_at": job["first_released_at"],
        "starts_within_seconds": None,
        "expected_finish_seconds": None,
    }
    if job["status"] == "completed":
        return view
    clients = conn.execute(ACTIVE_CLIENTS).fetchall()
    own = next((c for c in clients if c["client"] == job["owner_key_id"]), None)
    if own is None:  # every image finished; the job completes with the notifier's next batch
        return view
    view["share"] = share(own["weight"], sum(c["weight"] for c in clients), own["jobs"])
    state = conn.execute(STATE).fetchone()
    if state is not None and state["images_per_second"] > 0:
        pace = state["images_per_second"]
        if job["first_released_at"] is None:
            view["starts_within_seconds"] = state["window_images"] / pace  # the whole window turns over by then
        view["expected_finish_seconds"] = (job["total_images"] - finished) / (view["share"] * pace)
    return view

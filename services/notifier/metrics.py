"""The notifier's Prometheus metrics (served at /metrics of its health port: shared/health.py)."""

from prometheus_client import Counter

RESULTS_APPLIED = Counter("imgpipe_results_applied_total", "Result events applied to PostgreSQL (repeats included)")
JOBS_COMPLETED = Counter("imgpipe_jobs_completed_total", "Jobs whose every image is processed or failed")
WEBHOOK_ATTEMPTS = Counter(
    "imgpipe_webhook_attempts_total",
    "Webhook POSTs by outcome: delivered (2xx), retrying (another attempt follows), gave_up (the last one failed)",
    ["outcome"],
)

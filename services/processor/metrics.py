"""The processor's Prometheus metrics (served at /metrics of its health port: shared/health.py).
Counters and histograms only on the path of an image: a few microseconds each."""

from prometheus_client import Counter, Gauge, Histogram

IMAGES_PROCESSED = Counter("imgpipe_images_processed_total", "Images compressed and stored")
IMAGES_ENCODED = Counter(
    "imgpipe_images_encoded_total",
    "Images compressed, by the codec path that encoded them: turbojpeg (the fast JPEG path) or pillow",
    ["codec"],
)
IMAGES_FAILED = Counter("imgpipe_images_failed_total", "Images that failed, by reason (the failure code)", ["reason"])
DOWNLOADED_BYTES = Counter("imgpipe_downloaded_bytes_total", "Bytes downloaded, of the images processed")
STORED_BYTES = Counter("imgpipe_stored_bytes_total", "Bytes stored after compression, of the images processed")
DEAD_LETTERS = Counter(
    "imgpipe_dead_letters_total", "Request messages that were not valid events, sent to the dead-letter topic"
)

STAGE_SECONDS = Histogram(
    "imgpipe_stage_seconds",
    "Time of one stage of one image: download (each attempt, failed ones too), compress (waiting for a "
    "worker process included), store",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DOWNLOAD_SECONDS = STAGE_SECONDS.labels(stage="download")
COMPRESS_SECONDS = STAGE_SECONDS.labels(stage="compress")
STORE_SECONDS = STAGE_SECONDS.labels(stage="store")

# Read when scraped (set_function): nothing to update on the hot path.
IMAGES_IN_FLIGHT = Gauge(
    "imgpipe_images_in_flight",
    "Images being downloaded, compressed or stored, or waiting for a retry (at most processor_max_in_flight)",
)
IMAGES_QUEUED = Gauge("imgpipe_images_queued", "Messages taken from Kafka and waiting for room, by lane", ["lane"])

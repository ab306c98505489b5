"""Every setting of the three services, read from the environment (see the README's table)."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _env(name: str) -> AliasChoices:
    """Accept both the IMGPIPE_ name and the conventional unprefixed one; the IMGPIPE_ one wins."""
    return AliasChoices(f"IMGPIPE_{name}", name)


class Settings(BaseSettings):
    # validate_by_name: Settings(database_url=...) sets the field by its own name, not through an alias.
    # hide_input_in_errors: a validation error would otherwise print the whole environment's values, secrets too.
    model_config = SettingsConfigDict(
        env_prefix="IMGPIPE_", extra="ignore", validate_by_name=True, hide_input_in_errors=True
    )

    # Infrastructure
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", validation_alias=_env("KAFKA_BOOTSTRAP_SERVERS"))
    database_url: str = Field("postgresql://postgres@127.0.0.1:55432/imgpipe", validation_alias=_env("DATABASE_URL"))
    # The priority lane: images of jobs catching up to their fair share (services/api/fair_share.py), and
    # whatever other services produce. The processors take it first.
    topic_requested: str = "image.requested"
    # The bulk lane: the other images the dispatcher releases.
    topic_requested_bulk: str = "image.requested.bulk"
    topic_processed: str = "image.processed"
    topic_dead_letter: str = "image.requested.dlq"
    topic_processed_dead_letter: str = "image.processed.dlq"  # results the notifier cannot read
    # Jobs created over Kafka by services with no HTTP access to the API (shared/events.py JobRequested).
    topic_job_requested: str = "job.requested"
    topic_job_dead_letter: str = "job.requested.dlq"
    intake_group: str = "imgpipe-api-intake"
    topic_partitions: int = Field(12, ge=1)
    create_topics: bool = True
    kafka_session_timeout_ms: int = Field(10_000, ge=1)  # a crashed member's partitions wait this long
    kafka_auto_commit_interval_ms: int = Field(5_000, ge=1)
    # Of the topics imgpipe creates: on a three-broker cluster 3 and 2, so that acks=all survives one broker's loss.
    kafka_replication_factor: int = Field(1, ge=1)
    kafka_min_insync_replicas: int = Field(1, ge=1)
    # Secured Kafka, applied to every Kafka client (shared/kafka.py client_config). The SASL credentials
    # are needed with SASL_PLAINTEXT and SASL_SSL; the CA file (PEM) checks the brokers' certificates
    # with SSL and SASL_SSL (the system's CAs when unset).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None

    @model_validator(mode="after")
    def _sasl_needs_credentials(self):
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"kafka_security_protocol {self.kafka_security_protocol} needs "
                "kafka_sasl_username and kafka_sasl_password"
            )
        return self

    # API
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_base_url: str = "http://127.0.0.1:8000"
    # An upload is spooled to disk and read as a stream, so these bound disk, database and Kafka work,
    # not the API's memory: 1,000,000 rows of ~100-character URLs are ~100 MB; 256 MiB leaves room
    # for other columns.
    max_csv_bytes: int = Field(256 * 1024 * 1024, ge=1)
    max_images_per_job: int = Field(1_000_000, ge=1)
    status_page_size: int = Field(100, ge=1)
    # The dispatcher (services/api/dispatcher.py) keeps released-and-not-finished images at what the
    # processors finish in dispatch_window_seconds (measured), within these bounds: a shorter window lets a
    # new job reach the processors sooner, a longer one absorbs the pauses between its release rounds.
    dispatch_window_seconds: float = Field(1.0, gt=0)
    dispatch_window_min_images: int = Field(64, ge=1)
    dispatch_window_max_images: int = Field(20_000, ge=1)
    # How long the dispatcher's producer tries to deliver a round's events before that round fails and is
    # released again (librdkafka's message.timeout.ms).
    publish_attempt_seconds: float = Field(30.0, gt=0)
    # When set, every endpoint but services/api/guards.py's public ones (health, API description, web page,
    # stored files) needs "Authorization: Bearer <key>" (python -m services.api.keys).
    api_keys_required: bool = False
    # Bulkheads (services/api/limits.py). Uploads being accepted at once, and the bytes they declare: one
    # more is refused at once, before its body is read, with 429 too_many_uploads. Each upload parses on
    # a core and holds a connection of the intake pool (this many, plus one for the job intake over Kafka);
    # reads (status, output CSV, jobs, key checks) have a pool of their own, which uploads never touch.
    max_concurrent_uploads: int = Field(2, ge=1)
    max_uploading_bytes: int = Field(512 * 1024 * 1024, ge=1)
    api_read_connections: int = Field(4, ge=1)
    # How long a request waits for a free connection of its pool before answering 503 busy (the server
    # answers) or database_unavailable (it does not).
    api_connection_wait_seconds: float = Field(5.0, gt=0)
    # Per API key (one bucket for all callers while keys are off), unless the key has its own limits
    # (python -m services.api.keys set-limits): jobs created per minute, and images not finished at once.
    uploads_per_minute: int = Field(1200, ge=1)
    max_waiting_images: int = Field(3_000_000, ge=1)

    # Processor
    processor_group: str = "imgpipe-processor"
    processor_max_in_flight: int = Field(32, ge=1)  # images worked on at once, per process
    # Messages taken from Kafka and queued per lane, about 1 KB each. A paused partition's prefetched
    # messages are dropped and fetched again on resume: a long queue keeps the images in flight fed
    # meanwhile, and makes those stutters rare when a backlog fails fast (a dead host's 10,000 images).
    processor_queued_per_lane: int = Field(1000, ge=1)
    processor_max_in_flight_bytes: int = Field(32_000_000, ge=1)  # a body is read only once it fits beside what is held
    compress_processes: int | None = Field(None, ge=0)  # None: one per core; 0: compress in threads
    processor_drain_seconds: float = Field(20.0, ge=0)  # on SIGTERM, finish in-flight work this long
    # JPEG and WebP quality of a job that names none (IMGPIPE_JPEG_QUALITY: its former name, still read).
    default_quality: int = Field(
        50, ge=1, le=95, validation_alias=AliasChoices("IMGPIPE_DEFAULT_QUALITY", "IMGPIPE_JPEG_QUALITY")
    )
    jpeg_optimize: bool = False
    turbojpeg_library: str | None = None  # libturbojpeg's file (the fast JPEG path); None: as the loader finds it
    png_optimize: bool = False
    max_image_pixels: int = Field(100_000_000, ge=1)
    max_download_bytes: int = Field(50_000_000, ge=1)
    fetch_connect_timeout: float = Field(5.0, gt=0)
    fetch_read_timeout: float = Field(15.0, gt=0)
    fetch_total_timeout: float = Field(60.0, gt=0)  # a whole download, however slowly the server trickles it
    fetch_max_redirects: int = Field(5, ge=0)
    fetch_attempts: int = Field(3, ge=1)
    fetch_per_host_limit: int = Field(8, ge=1)  # concurrent downloads from one host, per process
    # Circuit breaker: after this many consecutive connection failures or timeouts on one host, its
    # images fail at once as host_unavailable for host_cooldown_seconds; then the host is tried again.
    host_failure_threshold: int = Field(5, ge=1)
    host_cooldown_seconds: float = Field(30.0, gt=0)
    image_max_attempts: int = Field(3, ge=1)  # tries after an unexpected error, then the image fails as internal_error
    storage: Literal["local", "cloudinary", "s3"] = "local"
    storage_dir: Path = REPO_ROOT / ".local" / "images"
    cloudinary_url: SecretStr | None = None
    cloudinary_upload_prefix: str | None = None
    cloudinary_folder: str = "imgpipe"
    # S3, or an S3-compatible store at s3_endpoint_url. Objects are <s3_prefix><request id>/<image id>.<ext>.
    # Credentials: both keys, or when neither is set boto3's default chain (AWS_* variables, ~/.aws, a role).
    # Output URLs: <s3_public_base_url>/<key> when set (a public bucket or a CDN in front of it), else
    # presigned GET URLs valid s3_presigned_url_expiry_seconds (SigV4 allows at most 7 days).
    s3_bucket: str | None = None
    s3_prefix: str = "imgpipe/"
    s3_region: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_public_base_url: str | None = None
    s3_presigned_url_expiry_seconds: int = Field(604_800, ge=1, le=604_800)

    # Notifier
    notifier_group: str = "imgpipe-notifier"
    # Lost events: every reconcile_interval_seconds, images that cannot still be on their way (see
    # services/notifier/reconciler.py) are requested again, up to reconcile_max_requests times, then fail as lost.
    reconcile_interval_seconds: float = Field(60.0, gt=0)
    reconcile_max_requests: int = Field(2, ge=0)
    webhook_secret: SecretStr | None = None
    webhook_timeout: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_backoff_seconds: float = Field(2.0, gt=0)

    # Image downloads and webhooks: refuse hosts that resolve to private, loopback or link-local
    # addresses unless this is set (local development and the tests, where everything is on 127.0.0.1),
    # or the host is one of allowed_private_hosts (e.g. an internal image server: "images.internal,10.0.0.5").
    allow_private_addresses: bool = False
    allowed_private_hosts: Annotated[list[str], NoDecode] = []

    @field_validator("allowed_private_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [host.strip() for host in value.split(",") if host.strip()] if isinstance(value, str) else value

    log_level: str = "INFO"
    # json: one JSON object per line (time, level, logger, message, and request_id / image_id on the
    # lines about a job or an image), for a log collector; text: readable lines, for a terminal.
    log_format: Literal["text", "json"] = "text"
    # The processor's and the notifier's /healthz, /readyz and /metrics (the API serves them on its own
    # port). 0 turns it off; several processes on one machine need one port each (deploy/local/services.py).
    health_host: str = "127.0.0.1"
    health_port: int = Field(8081, ge=0, le=65535)

    # Fault injection for the crash tests: "<point>" or "<point>:<n>" makes the service SIGKILL itself the
    # n-th time it reaches that point (shared/faults.py). Unset in production.
    crash_at: str | None = None


@lru_cache
def get_settings() -> Settings:
    return Settings()

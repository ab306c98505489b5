"""Where compressed images go: local disk (served by the API under /files/), Cloudinary or S3."""

import logging
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote, unquote, urlparse

import boto3
import botocore.config
import botocore.exceptions
import cloudinary.exceptions
import cloudinary.uploader

from services.processor.failures import ImageFailure, StorageUnavailable
from shared.failures import FailureCode
from shared.settings import Settings

log = logging.getLogger(__name__)

CLOUDINARY_UPLOAD_TIMEOUT_SECONDS = 60
# Answers that will be the same next time (bad request, bad credentials, forbidden, ...). Any other
# Cloudinary error (rate limits, 5xx, network errors, unparseable answers) means the storage is unavailable.
CLOUDINARY_PERMANENT_ERRORS = (
    cloudinary.exceptions.BadRequest,
    cloudinary.exceptions.AuthorizationRequired,
    cloudinary.exceptions.NotAllowed,
    cloudinary.exceptions.NotFound,
    cloudinary.exceptions.AlreadyExists,
)

S3_CONNECT_TIMEOUT_SECONDS = 10
S3_READ_TIMEOUT_SECONDS = 60
# S3 answers that another try may not get, besides any 5xx and 429: throttling and timeouts that come
# with a 4xx status. Any other answer (access denied, no such bucket, unknown key id, wrong region) will
# be the same next time.
S3_TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# No answer at all (refused, reset, DNS, timeouts, TLS, a proxy), or credentials that boto3's default chain
# cannot fetch right now (an instance role's endpoint down): the storage is unavailable.
S3_UNREACHABLE_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)


class Storage(Protocol):
    def save(self, key: str, data: bytes, content_type: str) -> str:
        """Store `data` under `key` (overwriting), and return the public URL of the stored object.
        Raise ImageFailure when this image can never be stored, StorageUnavailable when no image can now."""


class LocalStorage:
    def __init__(self, directory: Path, public_base_url: str):
        self.directory = Path(directory).resolve()
        self.public_base_url = public_base_url.rstrip("/")

    def save(self, key: str, data: bytes, content_type: str) -> str:
        """content_type is not stored: the API derives it from the key's extension when serving."""
        path = (self.directory / key).resolve()
        if not path.is_relative_to(self.directory) or path == self.directory:
            raise ValueError(f"storage key {key!r} points outside {self.directory}")
        try:
            self._write(path, data)
        except OSError as exc:  # a full disk, a missing mount, permissions: the disk's fault, not the image's
            raise StorageUnavailable(f"cannot write {path}: {exc}") from exc
        return f"{self.public_base_url}/files/{key}"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file beside the target, then rename over it: readers never see half a file.
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the result event is sent after this; the bytes must survive a crash
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


class CloudinaryStorage:
    def __init__(self, settings: Settings):
        if settings.cloudinary_url is None:
            raise ValueError(
                "storage=cloudinary needs CLOUDINARY_URL (cloudinary://<api_key>:<api_secret>@<cloud_name>)"
            )
        # Passed with each upload rather than through cloudinary.config(): the SDK's config(cloudinary_url=...)
        # stores the string without parsing it.
        self.options = _parse_cloudinary_url(settings.cloudinary_url.get_secret_value())
        if settings.cloudinary_upload_prefix:
            self.options["upload_prefix"] = settings.cloudinary_upload_prefix.rstrip("/")
        self.folder = settings.cloudinary_folder.strip("/")

    def save(self, key: str, data: bytes, content_type: str) -> str:
        public_id = str(PurePosixPath(self.folder, key).with_suffix(""))
        try:
            result = cloudinary.uploader.upload(
                data,
                public_id=public_id,
                overwrite=True,
                resource_type="image",
                timeout=CLOUDINARY_UPLOAD_TIMEOUT_SECONDS,
                **self.options,
            )
        except CLOUDINARY_PERMANENT_ERRORS as exc:
            raise ImageFailure(
                FailureCode.STORAGE_ERROR, f"Cloudinary refused the upload: {type(exc).__name__}: {exc}"
            ) from None
        except cloudinary.exceptions.Error as exc:
            raise StorageUnavailable(f"Cloudinary is unavailable: {type(exc).__name__}: {exc}") from exc
        return result["secure_url"]


def _parse_cloudinary_url(url: str) -> dict:
    parsed = urlparse(url)
    if parsed.scheme != "cloudinary" or not (parsed.hostname and parsed.username and parsed.password):
        raise ValueError("CLOUDINARY_URL must look like cloudinary://<api_key>:<api_secret>@<cloud_name>")
    return {
        "cloud_name": parsed.netloc.rpartition("@")[2],  # not .hostname, which lowercases
        "api_key": unquote(parsed.username),
        "api_secret": unquote(parsed.password),
    }


class S3Storage:
    def __init__(self, settings: Settings):
        if not settings.s3_bucket:
            raise ValueError("storage=s3 needs S3_BUCKET")
        access_key_id, secret_access_key = settings.s3_access_key_id, settings.s3_secret_access_key
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError(
                "S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY go together; set neither for boto3's default chain"
            )
        session = boto3.session.Session(
            aws_access_key_id=access_key_id.get_secret_value() if access_key_id else None,
            aws_secret_access_key=secret_access_key.get_secret_value() if secret_access_key else None,
            region_name=settings.s3_region,
        )
        if session.get_credentials() is None:
            raise ValueError(
                "storage=s3 found no credentials: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, "
                "or give boto3's default chain some (AWS_* variables, ~/.aws, an instance or task role)"
            )
        # One client for all of the processor's threads (boto3 clients are thread-safe), with a connection for
        # each image in flight.
        self.client = session.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            config=botocore.config.Config(
                signature_version="s3v4",
                connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
                read_timeout=S3_READ_TIMEOUT_SECONDS,
                max_pool_connections=settings.processor_max_in_flight,
                # No retries in the SDK, which would sleep in the image's thread: the pipeline retries an unavailable
                # storage itself, with backoff, holding no thread.
                retries={"mode": "standard", "total_max_attempts": 1},
            ),
        )
        self.bucket, self.prefix = settings.s3_bucket, settings.s3_prefix
        self.public_base_url = settings.s3_public_base_url.rstrip("/") if settings.s3_public_base_url else None
        self.presigned_url_expiry_seconds = settings.s3_presigned_url_expiry_seconds

    def save(self, key: str, data: bytes, content_type: str) -> str:
        object_key = self.prefix + key
        try:
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type)
            if self.public_base_url:
                return f"{self.public_base_url}/{quote(object_key)}"
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": object_key},
                ExpiresIn=self.presigned_url_expiry_seconds,
            )
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in S3_TRANSIENT_ERROR_CODES:
                raise StorageUnavailable(f"S3 is unavailable: {exc}") from exc
            raise ImageFailure(
                FailureCode.STORAGE_ERROR, f"S3 refused the upload to s3://{self.bucket}/{object_key}: {exc}"
            ) from None
        except S3_UNREACHABLE_ERRORS as exc:
            raise StorageUnavailable(f"S3 is unavailable: {type(exc).__name__}: {exc}") from exc


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "cloudinary":
        return CloudinaryStorage(settings)
    if settings.storage == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.storage_dir, settings.public_base_url)

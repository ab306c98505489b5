"""Where compressed images go: local disk (served by the API under /files/) or Cloudinary."""
import logging
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import unquote, urlparse

import cloudinary.exceptions
import cloudinary.uploader

from services.processor import failures
from services.processor.failures import ImageFailure, StorageUnavailable
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
            raise ValueError("storage=cloudinary needs CLOUDINARY_URL (cloudinary://<api_key>:<api_secret>@<cloud_name>)")
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
            raise ImageFailure(failures.STORAGE_ERROR, f"Cloudinary refused the upload: {type(exc).__name__}: {exc}") from None
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


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "cloudinary":
        return CloudinaryStorage(settings)
    return LocalStorage(settings.storage_dir, settings.public_base_url)

"""A stand-in for Cloudinary's Upload API on 127.0.0.1 that checks requests as Cloudinary documents it:
POST /v1_1/<cloud_name>/image/upload, multipart/form-data with file, api_key, timestamp and signature,
where signature = SHA-1 of the other parameters (not file, cloud_name, resource_type, api_key) sorted,
as k=v joined with & ("&" inside a pair written %26), followed by the API secret."""

import email.parser
import email.policy
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler

from PIL import Image

from testbed.http_servers import LoopbackHTTPServer, LoopbackServer

UNSIGNED_PARAMETERS = {"file", "cloud_name", "resource_type", "api_key", "signature"}
SIGNATURE_LIFETIME_SECONDS = 3600
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}


def string_to_sign(fields: dict[str, str]) -> str:
    pairs = (f"{k}={v}".replace("&", "%26") for k, v in fields.items() if k not in UNSIGNED_PARAMETERS and v)
    return "&".join(sorted(pairs))


def sign(fields: dict[str, str], api_secret: str) -> str:
    return hashlib.sha1((string_to_sign(fields) + api_secret).encode()).hexdigest()


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    if not message.is_multipart():
        raise ValueError("not multipart/form-data")
    # email's hints allow other types; a form-data part's name is a str and its decoded payload bytes
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)  # type: ignore[misc]
        for part in message.iter_parts()
    }


class _UploadHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        server: CloudinaryContractServer = self.server.owner
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if server.fail_with_status:
            return self.answer(server.fail_with_status, {"error": {"message": "General Error"}})
        if self.path != f"/v1_1/{server.cloud_name}/image/upload":
            return self.answer(404, {"error": {"message": f"Unknown path {self.path}"}})
        try:
            raw = parse_multipart(self.headers.get("Content-Type", ""), body)
        except ValueError as exc:
            return self.answer(400, {"error": {"message": str(exc)}})
        for required in ("file", "api_key", "timestamp", "signature"):
            if not raw.get(required):
                return self.answer(400, {"error": {"message": f"Missing required parameter - {required}"}})
        fields = {k: v.decode() for k, v in raw.items() if k != "file"}
        if fields["api_key"] != server.api_key:
            return self.answer(401, {"error": {"message": f"Unknown API key {fields['api_key']}"}})
        if fields["signature"] != sign(fields, server.api_secret):
            to_sign = string_to_sign(fields)
            return self.answer(
                401, {"error": {"message": f"Invalid Signature {fields['signature']}. String to sign - '{to_sign}'."}}
            )
        if abs(time.time() - int(fields["timestamp"])) > SIGNATURE_LIFETIME_SECONDS:
            return self.answer(401, {"error": {"message": "Stale request - reported time is more than 1 hour ago"}})
        try:
            with Image.open(io.BytesIO(raw["file"])) as image:
                image_format, (width, height) = image.format, image.size
                assert image_format is not None  # Image.open always names the format of what it opened
        except OSError:
            return self.answer(400, {"error": {"message": "Invalid image file"}})
        public_id = fields.get("public_id") or hashlib.sha1(raw["file"]).hexdigest()[:20]
        with server.lock:
            server.uploads[public_id] = raw["file"]
            server.received.append(fields)
        version = int(time.time())
        extension = EXTENSIONS.get(image_format, image_format.lower())
        url = f"{server.base_url}/{server.cloud_name}/image/upload/v{version}/{public_id}.{extension}"
        self.answer(
            200,
            {
                "public_id": public_id,
                "version": version,
                "resource_type": "image",
                "type": "upload",
                "format": extension,
                "width": width,
                "height": height,
                "bytes": len(raw["file"]),
                "url": url,
                "secure_url": url,
            },
        )

    def answer(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class CloudinaryContractServer(LoopbackServer):
    """Use as a context manager; `uploads` maps public_id -> stored bytes, `received` the signed fields."""

    def __init__(self, cloud_name: str, api_key: str, api_secret: str):
        self.cloud_name, self.api_key, self.api_secret = cloud_name, api_key, api_secret
        self.uploads: dict[str, bytes] = {}
        self.received: list[dict[str, str]] = []
        self.fail_with_status = 0  # set to e.g. 500 to imitate an outage
        self.lock = threading.Lock()
        super().__init__(_UploadHandler)

    def cloudinary_url(self, api_secret: str | None = None) -> str:
        return f"cloudinary://{self.api_key}:{api_secret or self.api_secret}@{self.cloud_name}"

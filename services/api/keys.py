"""API keys: create, revoke and list them (python -m services.api.keys), and find the key a request presents.

A key reads `imgpipe_<key id: 32 hex digits>_<secret: 43 url-safe characters, 256 random bits>`; only
the SHA-256 of the whole key is stored. The id part finds the key's row, and the hashes are compared
with hmac.compare_digest, so how long a refusal takes says nothing about how close a guess was.
"""

import argparse
import hashlib
import hmac
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row

from shared import db
from shared.settings import get_settings

PREFIX = "imgpipe_"
MAX_WEIGHT = 1000  # as the api_keys table's CHECK says
_ID_END = len(PREFIX) + 32


def key_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _key_id(key: str) -> uuid.UUID | None:
    """The id a well-formed key names, else None."""
    if not key.startswith(PREFIX) or key[_ID_END : _ID_END + 1] != "_" or len(key) <= _ID_END + 1:
        return None
    try:
        return uuid.UUID(hex=key[len(PREFIX) : _ID_END])
    except ValueError:
        return None


def create_key(conn: psycopg.Connection[Any], name: str, weight: float = 1.0) -> tuple[uuid.UUID, str]:
    """Store a new key named `name` and return (its id, the key): the only time the key is known.
    weight: the key's share of the processors against other keys' (services/api/fair_share.py)."""
    key_id = uuid.uuid4()
    key = f"{PREFIX}{key_id.hex}_{secrets.token_urlsafe(32)}"
    conn.execute(
        "INSERT INTO api_keys (id, name, key_sha256, weight) VALUES (%s, %s, %s, %s)",
        (key_id, name, key_sha256(key), weight),
    )
    return key_id, key


def set_weight(conn: psycopg.Connection[Any], name: str, weight: float) -> bool:
    """Give the key named `name` this weight (from the dispatcher's next round on); False if there is no such key."""
    return (
        conn.execute("UPDATE api_keys SET weight = %s WHERE name = %s RETURNING id", (weight, name)).fetchone()
        is not None
    )


def revoke_key(conn: psycopg.Connection[Any], name: str) -> bool:
    """Revoke the key named `name`; False if there is no such key not yet revoked."""
    revoked = conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL RETURNING id", (name,)
    ).fetchone()
    return revoked is not None


def set_limits(
    conn: psycopg.Connection[Any], name: str, uploads_per_minute: int | None, max_waiting_images: int | None
) -> bool:
    """Give the key named `name` limits of its own (None: the settings'); False if there is no such key."""
    return (
        conn.execute(
            "UPDATE api_keys SET uploads_per_minute = %s, max_waiting_images = %s WHERE name = %s RETURNING id",
            (uploads_per_minute, max_waiting_images, name),
        ).fetchone()
        is not None
    )


def list_keys(conn: psycopg.Connection[DictRow]) -> list[dict]:
    return conn.execute(
        "SELECT id, name, weight, uploads_per_minute, max_waiting_images, created_at, revoked_at"
        " FROM api_keys ORDER BY created_at"
    ).fetchall()


@dataclass(frozen=True)
class ApiKey:
    """An active key, as a request presents it: who it is, and its own limits (None: the settings')."""

    id: uuid.UUID
    name: str
    uploads_per_minute: int | None
    max_waiting_images: int | None


def find_active_key(pool: db.DictPool, presented: str) -> ApiKey | None:
    """The key `presented` if it is a stored key not revoked, else None."""
    key_id = _key_id(presented)
    if key_id is None:
        return None
    stored = _active_key(pool, key_id)
    if stored is None or not hmac.compare_digest(bytes(stored["key_sha256"]), key_sha256(presented)):
        return None
    return ApiKey(key_id, stored["name"], stored["uploads_per_minute"], stored["max_waiting_images"])


class ActiveKeys:
    """find_active_key with the keys found kept for CACHE_SECONDS, so that a client sending many requests
    does not cost a database query each: a revoked key, or a key's new weight or limits, take effect
    within that time. Only keys found are kept (at most CACHE_SIZE), so made-up keys cannot fill it."""

    CACHE_SECONDS = 5.0
    CACHE_SIZE = 10_000

    def __init__(self, pool: Callable[[], db.DictPool]):
        self.pool = pool
        self._found: dict[bytes, tuple[float, ApiKey]] = {}  # sha256 of the key -> (when found, the key)

    def find(self, presented: str) -> ApiKey | None:
        digest = key_sha256(presented)
        found_at, key = self._found.get(digest, (0.0, None))
        if key is not None and time.monotonic() - found_at < self.CACHE_SECONDS:
            return key
        key = find_active_key(self.pool(), presented)
        if key is None:
            self._found.pop(digest, None)
        else:
            if len(self._found) >= self.CACHE_SIZE:
                self._found.clear()
            self._found[digest] = (time.monotonic(), key)
        return key


def is_active_key(pool: db.DictPool, key_id: uuid.UUID) -> bool:
    """Whether a key with this id is stored and not revoked (a key named by id, e.g. in a job.requested event)."""
    return _active_key(pool, key_id) is not None


def _active_key(pool: db.DictPool, key_id: uuid.UUID) -> dict | None:
    with pool.connection() as conn:
        return conn.execute(
            "SELECT key_sha256, name, uploads_per_minute, max_waiting_images FROM api_keys"
            " WHERE id = %s AND revoked_at IS NULL",
            (key_id,),
        ).fetchone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.api.keys", description="Manage imgpipe API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("name", help="who or what the key is for; unique")
    create.add_argument(
        "--weight",
        type=_weight,
        default=1.0,
        help="its share of the processors against other keys' (default 1; e.g. 3 for an interactive client)",
    )
    weight = commands.add_parser("set-weight", help="change a key's share of the processors")
    weight.add_argument("name")
    weight.add_argument("weight", type=_weight)
    limits = commands.add_parser("set-limits", help="give a key limits of its own (an option left out: the setting's)")
    limits.add_argument("name")
    limits.add_argument("--uploads-per-minute", type=_positive, help="jobs it may create per minute")
    limits.add_argument("--max-waiting-images", type=_positive, help="images of its jobs not finished at once")
    revoke = commands.add_parser("revoke", help="revoke a key: requests with it are refused from now on")
    revoke.add_argument("name")
    commands.add_parser("list", help="list the keys (names, ids, dates; never the keys themselves)")
    args = parser.parse_args(argv)

    database_url = get_settings().database_url
    db.migrate(database_url)
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        if args.command == "create":
            try:
                key_id, key = create_key(conn, args.name, args.weight)
            except psycopg.errors.UniqueViolation:
                print(f"a key named {args.name!r} exists already", file=sys.stderr)
                return 1
            print(f"created API key {args.name!r} (id {key_id}); it is shown only this once:", file=sys.stderr)
            print(key)
        elif args.command == "set-weight":
            if not set_weight(conn, args.name, args.weight):
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"API key {args.name!r} now has weight {args.weight:g}", file=sys.stderr)
        elif args.command == "set-limits":
            if not set_limits(conn, args.name, args.uploads_per_minute, args.max_waiting_images):
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
            print(
                f"API key {args.name!r}: uploads per minute {args.uploads_per_minute or 'as the setting'}, "
                f"images waiting at most {args.max_waiting_images or 'as the setting'}",
                file=sys.stderr,
            )
        elif args.command == "revoke":
            if not revoke_key(conn, args.name):
                print(f"no active key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked API key {args.name!r}", file=sys.stderr)
        else:
            for row in list_keys(conn):
                revoked = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M:%S%z}" if row["revoked_at"] else "active"
                own_limits = "\t".join(
                    f"{label} {row[column] if row[column] is not None else 'default'}"
                    for label, column in (
                        ("uploads/min", "uploads_per_minute"),
                        ("waiting images", "max_waiting_images"),
                    )
                )
                print(
                    f"{row['name']}\t{row['id']}\tweight {row['weight']:g}\t{own_limits}"
                    f"\tcreated {row['created_at']:%Y-%m-%d %H:%M:%S%z}\t{revoked}"
                )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a limit is at least 1")
    return value


def _weight(text: str) -> float:
    weight = float(text)
    if not 0 < weight <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"a weight is above 0 and at most {MAX_WEIGHT:g}")
    return weight


if __name__ == "__main__":
    sys.exit(main())

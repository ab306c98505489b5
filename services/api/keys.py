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
import uuid

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shared import db
from shared.settings import get_settings

PREFIX = "imgpipe_"
MAX_WEIGHT = 1000  # as the api_keys table's CHECK says
_ID_END = len(PREFIX) + 32


def key_sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _key_id(key: str) -> uuid.UUID | None:
    """The id a well-formed key names, else None."""
    if not key.startswith(PREFIX) or key[_ID_END:_ID_END + 1] != "_" or len(key) <= _ID_END + 1:
        return None
    try:
        return uuid.UUID(hex=key[len(PREFIX):_ID_END])
    except ValueError:
        return None


def create_key(conn: psycopg.Connection, name: str, weight: float = 1.0) -> tuple[uuid.UUID, str]:
    """Store a new key named `name` and return (its id, the key): the only time the key is known.
    weight: the key's share of the processors against other keys' (services/api/fair_share.py)."""
    key_id = uuid.uuid4()
    key = f"{PREFIX}{key_id.hex}_{secrets.token_urlsafe(32)}"
    conn.execute("INSERT INTO api_keys (id, name, key_sha256, weight) VALUES (%s, %s, %s, %s)",
                 (key_id, name, key_sha256(key), weight))
    return key_id, key


def set_weight(conn: psycopg.Connection, name: str, weight: float) -> bool:
    """Give the key named `name` this weight (from the dispatcher's next round on); False if there is no such key."""
    return conn.execute("UPDATE api_keys SET weight = %s WHERE name = %s RETURNING id", (weight, name)).fetchone() is not None


def revoke_key(conn: psycopg.Connection, name: str) -> bool:
    """Revoke the key named `name`; False if there is no such key not yet revoked."""
    revoked = conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE name = %s AND revoked_at IS NULL RETURNING id", (name,)
    ).fetchone()
    return revoked is not None


def list_keys(conn: psycopg.Connection) -> list[dict]:
    return conn.execute("SELECT id, name, weight, created_at, revoked_at FROM api_keys ORDER BY created_at").fetchall()


def find_active_key(pool: ConnectionPool, presented: str) -> uuid.UUID | None:
    """The id of the key `presented` if it is a stored key not revoked, else None."""
    key_id = _key_id(presented)
    if key_id is None:
        return None
    stored = _active_key_sha256(pool, key_id)
    if stored is None:
        return None
    return key_id if hmac.compare_digest(stored, key_sha256(presented)) else None


def is_active_key(pool: ConnectionPool, key_id: uuid.UUID) -> bool:
    """Whether a key with this id is stored and not revoked (a key named by id, e.g. in a job.requested event)."""
    return _active_key_sha256(pool, key_id) is not None


def _active_key_sha256(pool: ConnectionPool, key_id: uuid.UUID) -> bytes | None:
    with pool.connection() as conn:
        row = conn.execute("SELECT key_sha256 FROM api_keys WHERE id = %s AND revoked_at IS NULL", (key_id,)).fetchone()
    return None if row is None else bytes(row["key_sha256"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.api.keys", description="Manage imgpipe API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (shown only this once)")
    create.add_argument("name", help="who or what the key is for; unique")
    create.add_argument("--weight", type=_weight, default=1.0,
                        help="its share of the processors against other keys' (default 1; e.g. 3 for an interactive client)")
    weight = commands.add_parser("set-weight", help="change a key's share of the processors")
    weight.add_argument("name")
    weight.add_argument("weight", type=_weight)
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
        elif args.command == "revoke":
            if not revoke_key(conn, args.name):
                print(f"no active key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked API key {args.name!r}", file=sys.stderr)
        else:
            for key in list_keys(conn):
                revoked = f"revoked {key['revoked_at']:%Y-%m-%d %H:%M:%S%z}" if key["revoked_at"] else "active"
                print(f"{key['name']}\t{key['id']}\tweight {key['weight']:g}\tcreated {key['created_at']:%Y-%m-%d %H:%M:%S%z}"
                      f"\t{revoked}")
    return 0


def _weight(text: str) -> float:
    weight = float(text)
    if not 0 < weight <= MAX_WEIGHT:
        raise argparse.ArgumentTypeError(f"a weight is above 0 and at most {MAX_WEIGHT:g}")
    return weight


if __name__ == "__main__":
    sys.exit(main())

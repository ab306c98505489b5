"""PostgreSQL access: a connection pool and the schema migrations (yoyo, from schemas/migrations)."""

import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool
from yoyo import get_backend, read_migrations

from shared.runtime import StartupError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "migrations"
# NOTIFY on this channel wakes the dispatcher (services/api/dispatcher.py): a job was stored, or results freed places.
RELEASE_CHANNEL = "imgpipe_release"
# What make_pool makes: its connections give rows as dicts.
DictPool = ConnectionPool[psycopg.Connection[DictRow]]


def signal_release(conn: psycopg.Connection[Any]) -> None:
    """Wake the dispatcher when the caller's transaction commits (at once without one)."""
    conn.execute(f"NOTIFY {RELEASE_CHANNEL}")


def make_pool(database_url: str, max_size: int = 4, timeout: float = 30.0) -> DictPool:
    """timeout: how long pool.connection() waits for a connection (e.g. while the server is down).
    Each connection is checked as it is handed out, so after a server restart no request gets a dead one."""
    pool: DictPool = ConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        kwargs={"row_factory": dict_row},
        open=False,
        timeout=timeout,
        check=ConnectionPool.check_connection,
    )
    pool.open(wait=True, timeout=30)
    return pool


class DatabaseUnavailable(StartupError):
    """PostgreSQL cannot be used with these settings; the message says why."""


def check_database(database_url: str, timeout: float = 30) -> None:
    """Raise DatabaseUnavailable, with one line saying why (never the URL's password), unless PostgreSQL
    accepts a connection within `timeout`. Refused credentials and a missing database fail at once."""
    info = conninfo_to_dict(database_url)
    where = f"PostgreSQL at {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(database_url, connect_timeout=5):
                return
        except psycopg.Error as exc:
            why = " ".join(str(exc).split())
            # A refusal at connect carries no SQLSTATE (libpq's message only): the server's own "FATAL:" says it
            # answered, e.g. with bad credentials or no such database, which waiting will not change.
            refused = (exc.sqlstate or "").startswith("28") or exc.sqlstate == "3D000" or " FATAL: " in why
            if refused or time.monotonic() >= deadline:
                raise DatabaseUnavailable(
                    f"{where} {'refused the connection' if refused else f'did not answer within {timeout:g}s'}: {why}"
                ) from None
        time.sleep(1)


def migrate(database_url: str) -> None:
    """Apply every migration not applied yet; safe to run from several processes at once (yoyo locks)."""
    backend = get_backend(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations))


if __name__ == "__main__":
    from shared.settings import get_settings

    migrate(get_settings().database_url)

"""PostgreSQL access: a connection pool and the schema migrations (yoyo, from schemas/migrations)."""
from pathlib import Path

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from yoyo import get_backend, read_migrations

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "migrations"


def make_pool(database_url: str, max_size: int = 4, timeout: float = 30.0) -> ConnectionPool:
    """timeout: how long pool.connection() waits for a connection (e.g. while the server is down).
    Each connection is checked as it is handed out, so after a server restart no request gets a dead one."""
    pool = ConnectionPool(database_url, min_size=1, max_size=max_size, kwargs={"row_factory": dict_row}, open=False,
                          timeout=timeout, check=ConnectionPool.check_connection)
    pool.open(wait=True, timeout=30)
    return pool


def migrate(database_url: str) -> None:
    """Apply every migration not applied yet; safe to run from several processes at once (yoyo locks)."""
    backend = get_backend(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        backend.apply_migrations(backend.to_apply(migrations))


if __name__ == "__main__":
    from shared.settings import get_settings

    migrate(get_settings().database_url)

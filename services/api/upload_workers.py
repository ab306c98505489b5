"""Uploads are read and stored in worker processes, one per upload slot (max_concurrent_uploads), so
that parsing a large CSV, which is all Python, never holds the API process's interpreter lock while it
answers reads: the CPU's bulkhead, beside the connection pools (make bench's load scenario, 16 uploads of
100,000 rows at once: GET /status every 50 ms had a p99 of 141 ms with the parsing in the API's threads,
31 ms with it in these workers). The endpoint copies the spooled upload to a file the worker opens; the
worker reads it as a stream and stores the job with COPY in one transaction (jobs.insert_job), on a
database connection of its own."""

import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import BinaryIO

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from services.api.csv_input import read_csv
from services.api.jobs import insert_job
from shared.db import DictPool
from shared.events import JobOptions
from shared.runtime import exit_with_parent

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 1024 * 1024


class DatabaseDown(Exception):
    """A worker could not reach PostgreSQL (the message says why); psycopg's own errors do not cross processes."""


class UploadWorkers:
    def __init__(self, database_url: str, workers: int, connection_wait_seconds: float):
        self.database = (database_url, connection_wait_seconds)
        self.workers = workers
        self.executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        executor = ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_set_database,
            initargs=(os.getpid(), *self.database),
        )
        for _ in range(self.workers):  # started now, not on the first uploads
            executor.submit(_ready)
        return executor

    def store(
        self, upload: BinaryIO, max_images: int, webhook_url: str | None, owner: uuid.UUID | None, options: JobOptions
    ) -> tuple[uuid.UUID, int]:
        """Store the CSV as a job in a worker; raises CsvError (and TooManyImages) or DatabaseDown."""
        with tempfile.NamedTemporaryFile(prefix="imgpipe-upload-", suffix=".csv", delete=False) as copy:
            shutil.copyfileobj(upload, copy, COPY_CHUNK_BYTES)
        try:
            return self.executor.submit(_store, copy.name, max_images, webhook_url, owner, options).result()
        except BrokenProcessPool:  # a worker was killed (say, out of memory): new ones for the next uploads
            log.error("an upload worker died; starting new ones")
            self.executor = self._start()
            raise
        finally:
            os.unlink(copy.name)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


_database: tuple[str, float] | None = None  # its URL, and how long to wait for a connection
_pool: DictPool | None = None


def _set_database(parent_pid: int, database_url: str, connection_wait_seconds: float) -> None:
    global _database
    _database = (database_url, connection_wait_seconds)
    exit_with_parent(parent_pid)


def _ready() -> None:
    pass


def _store(
    path: str, max_images: int, webhook_url: str | None, owner: uuid.UUID | None, options: JobOptions
) -> tuple[uuid.UUID, int]:
    global _pool
    try:
        if _pool is None:  # made on the first upload, without waiting: a database down at start breaks nothing
            assert _database is not None  # set by the executor's initializer
            url, wait = _database
            _pool = ConnectionPool(
                url,
                min_size=1,
                max_size=1,
                kwargs={"row_factory": dict_row},
                timeout=wait,
                check=ConnectionPool.check_connection,
            )
        with open(path, "rb") as csv_file:
            return insert_job(_pool, read_csv(csv_file, max_images), webhook_url, owner, options=options)
    except psycopg.OperationalError as exc:
        raise DatabaseDown(str(exc)) from None

"""Compression on every core. Pillow re-encoding JPEG scales to 1.39x one core on two threads of one
process but to 1.89x on two processes (docs/performance.md), so by default a pool of worker
processes does it, one per core; compress_processes=0 compresses in the calling thread instead."""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from services.processor.compress import Compressed, CompressOptions, compress
from services.processor.priority import PriorityGate
from shared.runtime import exit_with_parent


class Compressor:
    def __init__(self, processes: int | None, turbojpeg_library: str | None = None):
        self.processes = (os.cpu_count() or 1) if processes is None else processes
        self.turbojpeg_library = turbojpeg_library
        self._lock = threading.Lock()
        self._pool = self._new_pool() if self.processes else None
        # One image more than there are workers: each worker has the next image at hand, and an image
        # of the normal lane waits for at most that one, not for every bulk image in flight.
        self._gate = PriorityGate((self.processes or os.cpu_count() or 1) + 1)

    def compress(self, data: bytes | bytearray, options: CompressOptions, priority: int) -> Compressed:
        """compress() in a worker process; raises what it raises. A worker that died (a crash in a
        decoder, the kernel's OOM killer) breaks the pool: a new one is made and BrokenProcessPool is
        raised for the images that were in it, which count it as an unexpected error and try again."""
        with self._gate.slot(priority):
            return self._compress(data, options)

    def _compress(self, data: bytes | bytearray, options: CompressOptions) -> Compressed:
        pool = self._pool
        if pool is None:
            return compress(data, options)
        try:
            return pool.submit(compress, data, options).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = self._new_pool()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn, not fork: this process runs librdkafka's and httpx's threads, which a fork would copy mid-flight.
        pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(), self.turbojpeg_library),
        )
        # Start every worker now (each busy a moment, so the next submit spawns another), not at the first images.
        for future in [pool.submit(time.sleep, 0.05) for _ in range(self.processes)]:
            future.result()
        return pool


def _start_worker(parent_pid: int, turbojpeg_library: str | None) -> None:
    from services.processor import fast_jpeg  # in the worker only: the processor process itself needs no numpy

    fast_jpeg.load(turbojpeg_library)
    exit_with_parent(parent_pid)

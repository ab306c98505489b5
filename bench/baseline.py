"""Bare Pillow: the processor's own compress() over the same images held in memory, in a
multiprocessing.Pool (imap_unordered, chunksize 1), with no Kafka, HTTP or database."""
import multiprocessing
import os
import time

_images: list[bytes] = []
_options = None
_ready = None


def _load(images: list[bytes], ready) -> None:
    global _images, _options, _ready
    from services.processor.compress import CompressOptions
    from shared.settings import Settings

    _images, _options, _ready = images, CompressOptions.from_settings(Settings()), ready


def _warm_up(_n: int) -> None:
    """Each of the pool's processes must take one of these (the barrier): then all are loaded and warm."""
    from services.processor.compress import compress

    compress(_images[0], _options)  # Pillow's plugins load on first use: not part of the measurement
    _ready.wait(60)


def _compress(index: int) -> int:
    from services.processor.compress import compress

    return len(compress(_images[index], _options).data)


def pillow_throughput(images: list[bytes], order: list[int], processes: int) -> dict:
    """Images per second compressing images[i] for i in order with `processes` processes."""
    # As services/processor/__main__.py does; Pillow reads it when it is imported, so the workers
    # get it through their environment.
    os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes)
    with context.Pool(processes, initializer=_load, initargs=(images, ready)) as pool:
        pool.map(_warm_up, range(processes), chunksize=1)
        started = time.perf_counter()
        for _ in pool.imap_unordered(_compress, order, chunksize=1):
            pass
        seconds = time.perf_counter() - started
    return {"processes": processes, "images": len(order), "seconds": seconds, "images_per_second": len(order) / seconds}

"""Bare Pillow: each image decoded and saved again in its own format (JPEG and WebP at quality 50), over
the same images held in memory, in a multiprocessing.Pool (imap_unordered, chunksize 1), with
PILLOW_BLOCKS_MAX=16 as the processor runs it, and no Kafka, HTTP, database or fast JPEG path."""

import io
import multiprocessing
import os
import time

from PIL import Image

_images: list[bytes] = []
_ready = None


def pillow_reencode(data: bytes, quality: int = 50) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        output = io.BytesIO()
        image.save(output, image.format, **({"quality": quality} if image.format in ("JPEG", "WEBP") else {}))
        return output.getvalue()


def _load(images: list[bytes], ready) -> None:
    global _images, _ready
    _images, _ready = images, ready


def _warm_up(_n: int) -> None:
    """Each of the pool's processes must take one of these (the barrier): then all are loaded and warm."""
    pillow_reencode(_images[0])  # Pillow's plugins load on first use: not part of the measurement
    assert _ready is not None  # set by _load, the pool's initializer
    _ready.wait(60)


def _reencode(index: int) -> int:
    return len(pillow_reencode(_images[index]))


def pillow_throughput(images: list[bytes], order: list[int], processes: int) -> dict:
    """Images per second re-encoding images[i] for i in order with `processes` processes."""
    # As services/processor/__main__.py does; Pillow reads it when it is imported, so the workers
    # get it through their environment.
    os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(processes)
    with context.Pool(processes, initializer=_load, initargs=(images, ready)) as pool:
        pool.map(_warm_up, range(processes), chunksize=1)
        started = time.perf_counter()
        for _ in pool.imap_unordered(_reencode, order, chunksize=1):
            pass
        seconds = time.perf_counter() - started
    return {"processes": processes, "images": len(order), "seconds": seconds, "images_per_second": len(order) / seconds}

"""python -m services.processor: consume image.requested until SIGTERM or SIGINT."""
import ctypes
import os

# The download threads allocate buffers of an image's size (MBs). glibc would give each thread an arena of
# its own (up to 8 per core), each keeping what was freed in it, so peak RSS with 12-megapixel images in
# flight grew with the threads. Two arenas bound that and still reuse freed buffers; returning every
# large buffer to the system instead (mmap threshold 128 KiB, before the fast JPEG path) cost page
# faults on every download and hand-off: the processor's own CPU per JPEG fell from 13 to 6 ms without
# it (docs/performance.md). The compression workers (one thread each) keep glibc's defaults.
M_ARENA_MAX = -8  # glibc's mallopt() parameter
malloc_arenas = int(os.environ.get("MALLOC_ARENA_MAX", 2))
if hasattr(libc := ctypes.CDLL(None), "mallopt"):  # glibc; other C libraries keep their own ways
    libc.mallopt(M_ARENA_MAX, malloc_arenas)

# Pillow reads this once, when PIL.Image is first imported, so it is set before anything imports Pillow.
# Keeping more freed image blocks for reuse cut allocation time in decode-heavy work (docs/performance.md).
# The compression workers, spawned from this process, inherit it.
os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")

from services.processor import fast_jpeg  # noqa: E402
from services.processor.worker import run  # noqa: E402
from shared.health import serve_health  # noqa: E402
from shared.kafka import check_kafka  # noqa: E402
from shared.runtime import exit_on_startup_error, setup_logging, stop_on_signals  # noqa: E402
from shared.settings import get_settings  # noqa: E402


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    with exit_on_startup_error():
        fast_jpeg.load(settings.turbojpeg_library)
        serve_health(settings, "kafka", "consumer")  # first: /readyz says what is missing while Kafka is awaited
        check_kafka(settings)
    run(settings, stop_on_signals())


if __name__ == "__main__":
    main()

"""python -m services.processor: consume image.requested until SIGTERM or SIGINT."""

import os

from services.processor.memory import limit_arenas

limit_arenas()  # before any thread allocates

# Pillow reads this once, when PIL.Image is first imported, so it is set before anything imports Pillow.
# Keeping more freed image blocks for reuse cut allocation time in decode-heavy work (docs/performance.md).
# The compression workers, spawned from this process, inherit it.
os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")

from services.processor.libturbojpeg import library_path  # noqa: E402
from services.processor.worker import run  # noqa: E402
from shared.health import serve_health  # noqa: E402
from shared.kafka import check_kafka  # noqa: E402
from shared.runtime import exit_on_startup_error, setup_logging, stop_on_signals  # noqa: E402
from shared.settings import get_settings  # noqa: E402


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    with exit_on_startup_error():
        library_path(settings.turbojpeg_library)  # checked here; the compression workers load it
        serve_health(settings, "kafka", "consumer")  # first: /readyz says what is missing while Kafka is awaited
        check_kafka(settings)
    run(settings, stop_on_signals())


if __name__ == "__main__":
    main()

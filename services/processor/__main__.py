"""python -m services.processor: consume image.requested until SIGTERM or SIGINT."""
import os

# Pillow reads this once, when PIL.Image is first imported, so it is set before anything imports Pillow.
# Keeping more freed image blocks for reuse cut allocation time in decode-heavy work (docs/performance.md).
# The compression workers, spawned from this process, inherit it.
os.environ.setdefault("PILLOW_BLOCKS_MAX", "16")

from services.processor.worker import run  # noqa: E402
from shared.runtime import setup_logging, stop_on_signals  # noqa: E402
from shared.settings import get_settings  # noqa: E402


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level)
    run(settings, stop_on_signals())


if __name__ == "__main__":
    main()

"""Run the API: python -m services.api (host and port from IMGPIPE_API_HOST / IMGPIPE_API_PORT)."""

import logging

import uvicorn

from services.api.app import create_app
from shared.db import check_database
from shared.kafka import check_kafka
from shared.runtime import exit_on_startup_error, setup_logging
from shared.settings import get_settings


def main() -> None:
    settings = get_settings()
    setup_logging(settings.log_level, settings.log_format)
    with exit_on_startup_error():
        check_kafka(settings)
        check_database(settings.database_url)
    logging.getLogger(__name__).info("imgpipe API listening on http://%s:%d", settings.api_host, settings.api_port)
    uvicorn.run(  # log_config=None: uvicorn's lines (access log included) go through setup_logging's format
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        log_config=None,
    )


if __name__ == "__main__":
    main()

"""An ASGI app (the API) in a real uvicorn server on 127.0.0.1, in a thread of the test."""

import threading
import time

import uvicorn

from deploy.local.probe import free_port


class ApiServer:
    """Use as a context manager; the app's lifespan runs as in `python -m services.api`."""

    def __init__(self, app, start_timeout: float = 60):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="api-server", daemon=True)
        self.start_timeout = start_timeout

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ApiServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start (see the log above)")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

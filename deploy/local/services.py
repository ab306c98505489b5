"""Start, watch and stop the three imgpipe services as child processes (used by `make run` and the tests)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = {"api": "services.api", "processor": "services.processor", "notifier": "services.notifier"}
# One processor process keeps both cores busy (it compresses in a worker process per core); more
# add consumers, threads and memory without adding cores (bench/results/latest.md, scaling).
DEFAULT_PROCESSORS = 1


class ServiceGroup:
    def __init__(self, env: dict[str, str], log_dir: Path, processors: int = DEFAULT_PROCESSORS):
        """env: the services' whole environment (pass dict(os.environ) to inherit this one's)."""
        self.env = {**env, "PYTHONUNBUFFERED": "1"}
        self.log_dir = log_dir
        self.names = ["api", "notifier"] + [f"processor-{n}" for n in range(1, processors + 1)]
        self.processes: dict[str, subprocess.Popen] = {}
        self.env_overrides: dict[str, dict[str, str]] = {}  # service name -> variables for that one only
        # /healthz, /readyz and /metrics: the API serves them on its own port; the notifier gets
        # IMGPIPE_HEALTH_PORT (8081 by default) and processor-n the n-th port after it (0: all off).
        first = int(self.env.get("IMGPIPE_HEALTH_PORT", Settings.model_fields["health_port"].default))
        self.health_ports = {name: first + n if first else 0 for n, name in enumerate(self.names[1:])}

    def start(self, name: str | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in [name] if name else self.names:
            module = MODULES[service.split("-")[0]]
            health = {"IMGPIPE_HEALTH_PORT": str(self.health_ports[service])} if service in self.health_ports else {}
            env = {**self.env, **health, **self.env_overrides.get(service, {})}
            with open(self.log_dir / f"{service}.log", "ab") as log:
                self.processes[service] = subprocess.Popen(
                    [sys.executable, "-m", module], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )

    def wait_exit(self, name: str, timeout: float) -> int:
        """The exit status of the service once it has ended (negative: the signal that ended it)."""
        return self.processes[name].wait(timeout)

    def restart_exited(self) -> list[str]:
        exited = [name for name, proc in self.processes.items() if proc.poll() is not None]
        for name in exited:
            self.start(name)
        return exited

    def stop(self, timeout: float = 20) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

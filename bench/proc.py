"""CPU time and peak memory of process trees, and the owner of a listening port, read from /proc (Linux)."""

import os
import signal
import threading
from pathlib import Path

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on: the command name before it may contain spaces."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive (or not yet reaped)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process even after pid reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # stat field 22


def kill_descendants(descendants: list[tuple[int, int]]) -> None:
    """SIGKILL the (pid, start time) processes still alive, e.g. worker processes left behind by a killed service."""
    for pid, started in descendants:
        if start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every descendant of `root`."""
    return [(pid, started) for pid in tree(root)[1:] if (started := start_time(pid)) is not None]


def cpu_seconds(root: int, children: bool = True) -> float | None:
    """User + system CPU seconds of `root` (and with `children` of its whole tree, counting the
    descendants that have already exited through their parents' cutime/cstime)."""
    ticks, seen = 0, False
    for pid in tree(root) if children else [root]:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        seen = True
        utime, stime, cutime, cstime = (int(value) for value in fields[11:15])  # stat fields 14-17
        ticks += utime + stime + (cutime + cstime if children else 0)
    return ticks / TICKS_PER_SECOND if seen else None


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the largest resident set the process has had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class PeakRssSampler:
    """Samples VmHWM of a process and all its descendants until stopped; peak_mib is the sum over every
    process seen of its own peak (children may come and go, so each one's last reading is kept).
    On entering, each process's peak is reset to its RSS at that moment (/proc/<pid>/clear_refs), so that
    what a process did before (e.g. in an earlier scenario, when services are reused) does not count."""

    def __init__(self, root: int, interval: float = 0.1):
        self.root = root
        self.interval = interval
        self.peaks_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> "PeakRssSampler":
        for pid in tree(self.root):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for pid in tree(self.root):
            self.peaks_kib[pid] = max(self.peaks_kib.get(pid, 0), peak_rss_kib(pid))

    @property
    def peak_mib(self) -> float:
        return sum(self.peaks_kib.values()) / 1024


def listening_pid(port: int) -> int | None:
    """The process that listens on TCP `port` (e.g. the Kafka broker or the postmaster), if this user may see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            columns = line.split()
            if columns[3] == "0A" and int(columns[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{columns[9]}]")
    owners = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                owners.add(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
    # Forked children may share the listening socket: take the one whose parent is not an owner too.
    roots = [pid for pid in owners if (fields := _stat_fields(pid)) and int(fields[1]) not in owners]
    return min(roots) if roots else None

"""Run a real local PostgreSQL cluster on 127.0.0.1 (Debian's packaged binaries).

`LocalPostgres(data_dir).start()` is idempotent: initdb only once, and a server
already running from the same cluster is reused.

Where the cluster lives
-----------------------
initdb and postgres refuse to run as root. As root they therefore run as the
`postgres` OS user (`runuser -u postgres --`), and that user must own the
cluster and be able to traverse every parent directory. Requested data dirs
often sit below 0700 directories it cannot enter (pytest's
/tmp/pytest-of-root/..., `mktemp -d`, /root), so as root the cluster is kept in

    /var/tmp/imgpipe-postgres/<data_dir name>-<sha256(resolved data_dir)[:12]>/

(parents 0755; the cluster home is owned by postgres; /var/tmp survives reboots). The mapping is
deterministic, so the same data_dir always finds its cluster again; data_dir
itself only holds a `cluster` symlink to it for humans. Clusters whose data_dir
no longer exists (e.g. a deleted pytest tmp dir) and that are not running are
removed on the next start as root, so per-session test clusters do not pile up.
As a non-root user the cluster lives in data_dir itself and runs as that user.

Layout of a cluster home: pgdata/ (PGDATA), socket/ (unix socket), postgres.log.

CLI: python -m deploy.local.postgres {start,stop,status,remove} [--data-dir D] [--port P] [--database NAME]
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from deploy.local.debian import apt_install
from deploy.local.probe import port_open, tail

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO / ".local" / "postgres"
ROOT_BASE = Path("/var/tmp/imgpipe-postgres")
OS_USER = "postgres"  # the Debian package's service user; only used when running as root


def ensure_installed() -> Path:
    """Return the directory holding initdb/pg_ctl, installing Debian's postgresql if needed.

    Debian's package also creates a `main` cluster on port 5432 (started unless
    policy-rc.d forbids it, as in most containers); it is not used or touched here.
    """

    def find() -> Path | None:
        versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
        if versions:  # newest major version
            return max(versions, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
        initdb = shutil.which("initdb")
        return Path(initdb).parent if initdb else None

    bin_dir = find()
    if bin_dir is None:
        apt_install("postgresql")  # the server binaries (initdb, pg_ctl)
        bin_dir = find()
        if bin_dir is None:
            raise RuntimeError("installed postgresql but still found no initdb")
    return bin_dir


def _pid_alive(pgdata: Path) -> bool:
    try:
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), 0)
        return True
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return False


def _prune_orphans() -> None:
    for home in ROOT_BASE.glob("*"):
        origin = home / "origin"
        if origin.exists() and not Path(origin.read_text()).exists() and not _pid_alive(home / "pgdata"):
            shutil.rmtree(home, ignore_errors=True)


class LocalPostgres:
    def __init__(self, data_dir: Path, port: int = 55432, fast_unsafe: bool = False):
        """fast_unsafe=True turns off fsync/synchronous_commit/full_page_writes: for throwaway test clusters only."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.fast_unsafe = fast_unsafe
        self.as_root = os.geteuid() == 0
        if self.as_root:
            key = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
            self.home = ROOT_BASE / f"{self.data_dir.name[:20]}-{key}"
        else:
            self.home = self.data_dir
        self.pgdata = self.home / "pgdata"
        self.socket_dir = self.home / "socket"
        self.log_file = self.home / "postgres.log"

    @cached_property
    def bin_dir(self) -> Path:
        return ensure_installed()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", OS_USER, "--", *cmd]
        # cwd=/ : the postgres tools fail if they cannot read the current directory (e.g. /root)
        result = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                f"{self.log_file}:\n{tail(self.log_file)}"
            )
        return result

    def running_port(self) -> int | None:
        """Port of the server running from this cluster, else None."""
        if not (self.pgdata / "PG_VERSION").exists():
            return None
        if self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode != 0:
            return None
        # postmaster.pid line 4 is the port
        return int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])

    def start(self, timeout: float = 60) -> LocalPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent starters (e.g. pytest-xdist workers) share one server
            return self._start(timeout)

    def _start(self, timeout: float) -> LocalPostgres:
        running = self.running_port()
        if running is not None:
            if running != self.port:
                raise RuntimeError(f"postgres from {self.data_dir} already runs on port {running}, not {self.port}")
            return self
        if port_open(self.port):
            raise RuntimeError(f"cannot start postgres from {self.data_dir}: 127.0.0.1:{self.port} is already in use")
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "-U", "postgres", "-E", "UTF8", "--no-locale")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={shlex.quote(str(self.socket_dir))}"
        if self.fast_unsafe:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.pgdata),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(timeout)),
            "-o",
            opts,
        )
        return self

    def _prepare_dirs(self) -> None:
        if not self.as_root:
            self.socket_dir.mkdir(parents=True, exist_ok=True)
            return
        try:
            owner = pwd.getpwnam(OS_USER)
        except KeyError:
            raise RuntimeError(
                f"running as root needs the '{OS_USER}' OS user (apt-get install -y postgresql)"
            ) from None
        _prune_orphans()
        ROOT_BASE.mkdir(parents=True, exist_ok=True)
        ROOT_BASE.chmod(0o755)
        for d in (self.home, self.socket_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, owner.pw_uid, owner.pw_gid)
        (self.home / "origin").write_text(str(self.data_dir))
        link = self.data_dir / "cluster"
        if not link.is_symlink():
            link.symlink_to(self.home)

    def stop(self, timeout: float = 30) -> None:
        if self.running_port() is not None:
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", str(int(timeout)))

    def remove(self) -> None:
        """Stop the server and delete the cluster with all its data (`make clean`, test teardown)."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)
        (self.data_dir / "cluster").unlink(missing_ok=True)

    def create_database(self, name: str) -> None:
        import psycopg
        from psycopg import errors, sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (errors.DuplicateDatabase, errors.UniqueViolation):  # created concurrently
                pass


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url`."""
    return urlunparse(urlparse(server_url)._replace(path=f"/{name}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.postgres", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "remove"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--port", type=int, default=55432)
    parser.add_argument("--database", default="imgpipe")
    args = parser.parse_args(argv)
    pg = LocalPostgres(args.data_dir, port=args.port)
    if args.command == "start":
        pg.start()
        pg.create_database(args.database)
        print(f"postgres running: {pg.url(args.database)} (cluster {pg.home})")
    elif args.command == "stop":
        pg.stop()
        print("postgres stopped")
    elif args.command == "remove":
        pg.remove()
        print(f"postgres stopped and its cluster removed ({pg.home})")
    else:
        port = pg.running_port()
        if port is None:
            print(f"postgres not running (cluster {pg.home})")
            return 1
        print(f"postgres running on 127.0.0.1:{port} (cluster {pg.home})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

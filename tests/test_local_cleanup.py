"""`make clean` and the test sessions delete the PostgreSQL clusters they own, wherever they live."""

import subprocess
import sys

from deploy.local.postgres import LocalPostgres, ensure_installed
from deploy.local.probe import free_port, port_open
from shared.settings import REPO_ROOT


def test_remove_stops_the_cluster_and_deletes_it(tmp_path):
    ensure_installed()
    data_dir = tmp_path / "postgres"
    postgres = LocalPostgres(data_dir, port=free_port(), fast_unsafe=True).start()
    assert (postgres.pgdata / "PG_VERSION").exists()

    command = [
        sys.executable,
        "-m",
        "deploy.local.postgres",
        "remove",
        "--data-dir",
        str(data_dir),
        "--port",
        str(postgres.port),
    ]
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True)

    assert not postgres.home.exists()
    assert not port_open(postgres.port)


def test_make_clean_removes_the_database_and_stops_kafka():
    planned = subprocess.run(["make", "-n", "clean"], check=True, cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert "-m deploy.local.postgres remove\n" in planned
    assert "-m deploy.local.postgres remove --data-dir .local/bench/postgres" in planned
    assert "-m deploy.local.kafka stop" in planned
    assert "rm -rf .local" in planned

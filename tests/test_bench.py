"""A tiny run of the benchmark harness (bench/, `make bench`) on the session's Kafka and PostgreSQL, so
that it cannot rot. It checks that every scenario ran and was reported, never a timing target."""

import json
import os
import subprocess
import sys

from PIL import Image

from bench.scenarios import SCENARIOS
from deploy.local.services import REPO_ROOT


def test_a_tiny_benchmark_run_reports_every_scenario(infra, tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap_servers, "DATABASE_URL": infra.database_url}
    command = [
        sys.executable,
        "-m",
        "bench",
        "--scale",
        "0.005",
        "--max-wait",
        "4",
        "--in-flight",
        "1,4",
        "--processors",
        "1",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-6000:]}"

    report = json.loads((out / "latest.json").read_text())
    assert set(report["scenarios"]) == set(SCENARIOS)
    for name, outcome in report["scenarios"].items():
        assert outcome["checks"] and outcome["jobs"], name
    assert set(report["baseline"]) == {"mixed", "jpegs"}  # bare Pillow over each efficiency job's images
    assert all(set(baseline) == {"1_process", "2_processes"} for baseline in report["baseline"].values())
    assert "| scenario | measured | target | met? |" in (out / "latest.md").read_text()
    with Image.open(out / "scaling.png") as figure:
        assert figure.format == "PNG"
        figure.load()

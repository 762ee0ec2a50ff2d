"""bench/coordinator.py runs end to end, tiny: seeds SQLite, starts `serve coordinator`, loads it
with a few workers, restarts it, and prints one JSON object with every field. No timing is
checked (this is not a performance test); only that each figure is there and has a sane type.
Plus the seeding's pure parts: the batched rows are what `insert_job` writes, and the templated
JSON equals `JobRecord.to_json`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, base_env

sys.path.insert(0, str(ROOT))  # bench/ lives at the repository root, beside tests/
from bench import coordinator as bc

NUMBERS = (
    "claim_p50_ms",
    "claim_p99_ms",
    "claim_max_ms",
    "claims_per_s",
    "renewals_per_s",
    "reports_per_s",
    "releases_per_s",
    "start_to_first_claim_s",
    "restart_to_first_claim_s",
    "stop_s",
    "server_cpu_s",
    "client_cpu_s",
    "rss_idle_mb",
    "rss_mb",
    "rss_after_restart_mb",
    "seed_seconds",
    "elapsed_s",
    "seconds",
    "lease_seconds",
)
COUNTS = ("jobs", "history", "workers", "channels", "claims", "claims_assigned", "claims_empty", "cpu_cores")


@pytest.mark.slow
@pytest.mark.integration
def test_bench_coordinator_tiny_run_prints_every_field(tmp_path: Path):
    db = tmp_path / "bench.sqlite3"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.coordinator",
            "--db",
            f"sqlite:///{db}",
            "--jobs",
            "20",
            "--history",
            "50",
            "--workers",
            "4",
            "--seconds",
            "3",
            "--work-dir",
            str(tmp_path),
            "--json",
        ],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["db"] == "sqlite" and doc["coordinator"].startswith("ours")
    assert (doc["jobs"], doc["history"], doc["workers"]) == (20, 50, 4)
    assert doc["seed_capped"] is False
    for key in NUMBERS:
        value = doc[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value) and value >= 0, (key, value)
    for key in COUNTS:
        assert isinstance(doc[key], int) and not isinstance(doc[key], bool) and doc[key] >= 0, (key, doc[key])
    assert doc["claims"] == doc["claims_assigned"] + doc["claims_empty"] > 0
    assert doc["claim_p50_ms"] <= doc["claim_p99_ms"] <= doc["claim_max_ms"]
    assert isinstance(doc["errors"], dict)
    assert isinstance(doc["cpu_model"], str) and doc["cpu_model"]
    # The server process ran this checkout's package (the editable install), not another copy.
    assert Path(doc["server_module"]).resolve().is_relative_to(ROOT)
    assert not db.exists()  # the bench removes the database it seeded


def test_seeded_rows_are_insert_jobs_and_json_is_job_records(tmp_path: Path):
    from novelcrafter.coordinator.db import Database
    from novelcrafter.coordinator.record import JobRecord

    url = f"sqlite:///{tmp_path / 'seed.sqlite3'}"
    seeded = bc.seed_database(url, 7, 13, history_events=2, max_seconds=0)
    assert (seeded.jobs, seeded.history, seeded.capped) == (7, 13, False)
    db = Database(url)
    try:
        with db.transaction() as tx:
            rows = tx.all("SELECT job_id, state, active, claimable, seq, record FROM jobs ORDER BY job_id")
            events = tx.one("SELECT COUNT(*) FROM job_events")[0]
    finally:
        db.close()
    assert len(rows) == 20
    live = [r for r in rows if r[2] == 1]
    assert len(live) == 7 and all(r[3] == 1 and r[4] == 3 for r in live)  # claimable, 3 creation events
    assert events == 7 * 3 + 13 * 2
    for job_id, _state, _active, _claimable, _seq, record in rows:
        rec = JobRecord.from_json(json.loads(record))
        assert rec.job.job_id == job_id and len(rec.part_data) == len(rec.job.parts) == bc.PARTS
        assert json.loads(record) == JobRecord.to_json(rec)  # the template JSON is the real one

    factory = bc.JobFactory(history_events=0)
    for n in range(1, 5):
        rec, _ = factory.finished(100 + n, n)
        assert rec.to_json() == JobRecord.to_json(rec)
        baseline = bc._baseline_json(rec)
        assert baseline["format"] == 1 and "epoch" not in baseline


def test_quantiles():
    assert bc.quantile_ms([], 0.5) is None
    assert bc.quantile_ms([0.001, 0.002, 0.003], 0.5) == 2.0
    assert bc.quantile_ms([0.001, 0.003], 0.5) == 2.0
    assert bc.quantile_ms([0.001, 0.002, 0.003], 1.0) == 3.0

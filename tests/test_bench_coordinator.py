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
from types import SimpleNamespace

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
@pytest.mark.parametrize("pace", [0.0, 0.2], ids=["saturating", "paced"])
def test_bench_coordinator_tiny_run_prints_every_field(tmp_path: Path, pace: float):
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
            *(["--pace", str(pace)] if pace else []),
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
    assert doc["pace"] == pace
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
    if pace:
        # 4 workers, each holding a part for 3 rounds of 0.2 s, in 3 s: a handful of claims each,
        # nowhere near the thousands a saturating run makes; every claimed part was renewed.
        assert doc["claims"] <= 4 * (3 / pace + 1)
        assert doc["renewals_per_s"] > 0 and doc["reports_per_s"] > 0
    # The server process ran this checkout's package (the editable install), not another copy.
    assert Path(doc["server_module"]).resolve().is_relative_to(ROOT)
    assert not db.exists()  # the bench removes the database it seeded


def test_pace_header_and_arguments(capsys: pytest.CaptureFixture[str]):
    info = {key: "x" for key in ("cpu_model", "cpu_cores", "cpu_affinity", "memory_gb", "load_average_1m")}
    info |= {key: "x" for key in ("python", "grpcio", "sqlite", "date")}
    args = SimpleNamespace(
        workers=4,
        channels=1,
        seconds=3.0,
        renewals=3,
        reports=3,
        think_ms=0.0,
        idle_sleep=0.1,
        lease_seconds=30.0,
    )
    assert "pace 0 (saturating" in bc.header(info, SimpleNamespace(**vars(args), pace=0.0))
    assert "pace 10 s (paced" in bc.header(info, SimpleNamespace(**vars(args), pace=10.0))
    for bad in (["--pace", "-1"], ["--pace", "1", "--think-ms", "5"]):
        with pytest.raises(SystemExit):
            bc.main(bad)
        assert "--pace" in capsys.readouterr().err


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

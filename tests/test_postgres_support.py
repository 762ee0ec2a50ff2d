"""The throwaway PostgreSQL server of the tests (tests/pg_support.py, the ``postgres`` fixture):
password authentication over TCP, and an outage (stop, start) that keeps the committed data."""

from __future__ import annotations

import psycopg
import pytest
from pg_support import PostgresServer

pytestmark = pytest.mark.integration


def test_the_server_takes_a_password_over_tcp_and_keeps_its_data_through_an_outage(
    postgres: PostgresServer,
) -> None:
    assert postgres.url.startswith("postgresql://novelcrafter:")
    assert "@127.0.0.1:" in postgres.url and postgres.url.endswith("/novelcrafter")
    with psycopg.connect(postgres.url, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE outage_probe (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        conn.execute("INSERT INTO outage_probe VALUES (1, 'before the outage')")
    wrong = postgres.url.replace(f":{postgres.password}@", ":not-the-password@")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)

    held = psycopg.connect(postgres.url, connect_timeout=10, autocommit=True)
    postgres.stop()
    try:
        assert not postgres.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres.url, connect_timeout=5)
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")  # an open connection is cut by the fast shutdown
    finally:
        held.close()
        postgres.start()

    with psycopg.connect(postgres.url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT id, note FROM outage_probe").fetchall()
        conn.execute("DROP TABLE outage_probe")
    assert rows == [(1, "before the outage")]


def test_a_test_can_have_a_database_of_its_own(postgres: PostgresServer, postgres_url: str) -> None:
    assert postgres_url == postgres.url
    url = postgres.create_database()
    assert url != postgres_url and url.rsplit("/", 1)[0] == postgres_url.rsplit("/", 1)[0]
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == url.rsplit("/", 1)[1]
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)

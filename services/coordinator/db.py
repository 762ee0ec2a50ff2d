"""The coordinator's state in a database: SQLite on one machine, PostgreSQL for replicas.

One URL (``NOVELCRAFTER_DB``) picks it: ``sqlite:///PATH`` (the default, beside a local store:
nothing to install) or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` (any number of coordinator
replicas on one database). Both run the same SQL; the differences are spelled here once:
parameter style, row locks (PostgreSQL's ``FOR UPDATE [SKIP LOCKED]``; SQLite takes its one
write lock at ``BEGIN IMMEDIATE``) and the byte type.

Migrations are numbered lists of statements in :data:`MIGRATIONS`, applied in order under a
lock and recorded in ``schema_version``; a database whose schema is newer than this code is
refused with one clear error. An unreachable database is UNAVAILABLE, naming it (never the
password).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from novelcrafter.errors import FailedPrecondition, InvalidArgument, Unavailable
from novelcrafter.logs import get_logger, kv

log = get_logger(__name__)

POOL_SIZE = 8  # PostgreSQL connections per coordinator process (each transaction takes one)
CONNECT_TIMEOUT = 5  # seconds
SQLITE_BUSY_MS = 10_000  # another process holds SQLite's write lock: wait this long

# Each migration: (version, statements). {BYTES} is the dialect's byte-string type.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE jobs (
                job_id TEXT PRIMARY KEY,
                book_id TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                state INTEGER NOT NULL,
                active SMALLINT NOT NULL,
                claimable SMALLINT NOT NULL,
                device TEXT NOT NULL,
                lease_expiry DOUBLE PRECISION,
                epoch BIGINT NOT NULL,
                seq BIGINT NOT NULL,
                record TEXT NOT NULL
            )""",
            "CREATE INDEX jobs_claim ON jobs (claimable, created_at, job_id)",
            "CREATE INDEX jobs_lease_expiry ON jobs (lease_expiry)",
            "CREATE INDEX jobs_book ON jobs (book_id, created_at)",
            "CREATE INDEX jobs_state ON jobs (state)",
            """CREATE TABLE leases (
                job_id TEXT NOT NULL,
                part INTEGER NOT NULL,
                worker_id TEXT NOT NULL,
                epoch BIGINT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (job_id, part)
            )""",
            "CREATE INDEX leases_worker ON leases (worker_id)",
            """CREATE TABLE job_events (
                job_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                event {BYTES} NOT NULL,
                PRIMARY KEY (job_id, seq)
            )""",
            "CREATE TABLE coordinator_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class Tx:
    """One transaction: ``execute``/``one``/``all`` with ``?`` parameters on either dialect."""

    def __init__(self, db: Database, cursor: Any) -> None:
        self.db = db
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self._cursor.execute(self.db.sql(sql), tuple(params))
        return self._cursor

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self.db.sql(sql), [tuple(r) for r in rows])

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.execute(sql, params).fetchall())


class Database:
    """Transactions on SQLite or PostgreSQL (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        scheme = urlsplit(url).scheme.split("+", 1)[0]
        if scheme == "sqlite":
            self.dialect = "sqlite"
        elif scheme in ("postgresql", "postgres"):
            self.dialect = "postgresql"
        else:
            raise InvalidArgument(
                f"NOVELCRAFTER_DB must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB "
                f"(got {redact(url)[:120]!r})"
            )
        self.for_update = " FOR UPDATE" if self.dialect == "postgresql" else ""
        self.skip_locked = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgresql" else ""
        self._lock = threading.Lock()  # SQLite: one transaction at a time in this process
        self._sqlite: sqlite3.Connection | None = None
        self._pool: queue.LifoQueue[Any] = queue.LifoQueue()
        self._opened = 0
        self._pool_lock = threading.Lock()
        self._closed = False

    # --- connections ----------------------------------------------------------------------------

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    def _unavailable(self, exc: BaseException) -> Unavailable:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Unavailable(f"the coordinator's database {redact(self.url)} is unavailable: {first}")

    def _sqlite_connection(self) -> sqlite3.Connection:
        if self._sqlite is None:
            path = self.url.split("://", 1)[1]
            path = path[1:] if path.startswith("/") else path  # sqlite:///rel → rel, sqlite:////abs → /abs
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path, timeout=SQLITE_BUSY_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            conn.execute("PRAGMA synchronous=FULL")  # an acknowledged change survives power loss
            conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            self._sqlite = conn
        return self._sqlite

    def _pg_connection(self) -> Any:
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            pass
        with self._pool_lock:
            may_open = self._opened < POOL_SIZE
            if may_open:
                self._opened += 1
        if not may_open:
            return self._pool.get(timeout=60)
        import psycopg

        try:
            return psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT, autocommit=False)
        except psycopg.Error as exc:
            with self._pool_lock:
                self._opened -= 1
            raise self._unavailable(exc) from None

    def _discard(self, conn: Any) -> None:
        try:
            conn.close()
        finally:
            with self._pool_lock:
                self._opened -= 1

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back when it raises. A lost
        connection is UNAVAILABLE (the caller's RPC fails; nothing half-written)."""
        if self._closed:
            raise Unavailable("the coordinator is shutting down")
        if self.dialect == "sqlite":
            with self._lock:
                conn = self._sqlite_connection()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise self._unavailable(exc) from None
                # The cursor is closed inside the lock: freed later (by another thread's garbage
                # collection) it would reset a cached statement the next transaction is using.
                cursor = conn.cursor()
                try:
                    try:
                        yield Tx(self, cursor)
                    finally:
                        cursor.close()
                    conn.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise self._unavailable(exc) from None
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            return
        import psycopg

        conn = self._pg_connection()
        try:
            with conn.cursor() as cursor:
                yield Tx(self, cursor)
            conn.commit()
        except psycopg.OperationalError as exc:
            self._discard(conn)
            raise self._unavailable(exc) from None
        except psycopg.Error as exc:
            if conn.closed or conn.broken:
                self._discard(conn)
                raise self._unavailable(exc) from None
            conn.rollback()
            self._pool.put(conn)
            raise
        except BaseException:
            if conn.closed or conn.broken:
                self._discard(conn)
            else:
                conn.rollback()
                self._pool.put(conn)
            raise
        else:
            self._pool.put(conn)

    def close(self) -> None:
        self._closed = True
        if self._sqlite is not None:
            with self._lock:
                self._sqlite.close()
                self._sqlite = None
        while True:
            try:
                self._discard(self._pool.get_nowait())
            except queue.Empty:
                break

    # --- schema ---------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Bring the schema to :data:`SCHEMA_VERSION` (every replica may call this at once)."""
        byte_type = "BYTEA" if self.dialect == "postgresql" else "BLOB"
        with self.transaction() as tx:
            if self.dialect == "postgresql":
                tx.execute("SELECT pg_advisory_xact_lock(7253410)")  # one migrating replica at a time
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = tx.one("SELECT MAX(version) FROM schema_version")
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise FailedPrecondition(
                    f"the coordinator's database {redact(self.url)} has schema version {current}, "
                    f"newer than this novelcrafter's {SCHEMA_VERSION}: upgrade novelcrafter"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    tx.execute(statement.replace("{BYTES}", byte_type))
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                log.info("database migrated", extra=kv(db=redact(self.url), version=version))
        return max(current, SCHEMA_VERSION)


def default_url(store_url: str) -> str:
    """SQLite beside a local store (``./data`` → ``./data/coordinator.sqlite3``). An S3 store
    has no such place (a file on one host would part from the store it describes): it needs
    NOVELCRAFTER_DB."""
    if "://" not in store_url or store_url.startswith("file://"):
        root = store_url.removeprefix("file://")
        return f"sqlite:///{Path(root).resolve()}/coordinator.sqlite3"
    raise FailedPrecondition(
        f"the store {store_url} is not a local folder: set NOVELCRAFTER_DB to the coordinator's database "
        "(postgresql://USER:PASSWORD@HOST:PORT/DB, or sqlite:///PATH on a disk that persists)"
    )

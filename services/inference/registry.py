"""Adapter registry: which versions exist, which one `latest` means, which are in memory.

* Versions are immutable ids; the in-memory cache is keyed by (book, version), never by a
  name that could be reloaded with other weights.
* A watcher thread re-reads the store every ``watch_interval`` seconds (and on
  ``ReloadAdapters``). When a book's ``latest`` pointer names a new version, that version is
  downloaded (checksums verified), validated against the base model and loaded *before*
  the book's alias flips to it — atomically, under a lock. A version that fails is marked
  rejected with its reason and the previous version keeps serving.
* Requests resolve to a :class:`LoadedAdapter` object and keep it for their whole run;
  eviction (LRU beyond ``max_adapters``) only drops the registry's reference, so an
  evicted version is freed when its last request finishes.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from novelcrafter import layout
from novelcrafter.adapters import AdapterMeta, download_adapter, load_latest, load_meta
from novelcrafter.errors import FailedPrecondition, InvalidArgument, NotFound, StoreError
from novelcrafter.logs import get_logger
from novelcrafter.store import Store

from .lora import AdapterRejected, LoraWeights

log = get_logger(__name__)

BASE = "base"
LATEST = "latest"
ON_DEMAND_REFRESH_SECONDS = 1.0  # a miss re-reads that book from the store at most this often


@dataclass(eq=False)
class LoadedAdapter:
    """A version in memory. Requests hold this object; its weights live as long as it does."""

    meta: AdapterMeta
    weights: LoraWeights
    loaded_at: float
    last_used_at: float = 0.0

    @property
    def book_id(self) -> str:
        return self.meta.book_id

    @property
    def version(self) -> str:
        return self.meta.version


@dataclass
class VersionRecord:
    meta: AdapterMeta
    error: str = ""  # set when rejected
    rank: int = 0
    loaded_at: float = 0.0
    last_used_at: float = 0.0


@dataclass
class AdapterStatus:
    """One row of ``ListAdapters``."""

    meta: AdapterMeta
    state: str  # available | loaded | rejected
    latest: bool
    loaded_at: float
    last_used_at: float
    rank: int
    error: str


@dataclass
class RegistryHooks:
    on_load: Callable[[str, float], None] = lambda result, seconds: None  # result: loaded | rejected
    on_swap: Callable[[str], None] = lambda book: None
    on_evict: Callable[[], None] = lambda: None
    on_held: Callable[[int], None] = lambda count: None
    # The evicted version object: a backend that holds it outside this process (vLLM) unloads
    # it once its last in-flight request ends.
    on_drop: Callable[[LoadedAdapter], None] = lambda loaded: None


# Loads an adapter directory into validated weights (engine-specific), or raises AdapterRejected.
Loader = Callable[[Path, AdapterMeta], LoraWeights]


@dataclass
class AdapterRegistry:
    store: Store
    loader: Loader
    max_adapters: int = 8
    watch_interval: float = 2.0
    hooks: RegistryHooks = field(default_factory=RegistryHooks)

    def __post_init__(self) -> None:
        if self.max_adapters < 1:
            raise InvalidArgument("max adapters must be at least 1")
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._versions: dict[tuple[str, str], VersionRecord] = {}
        self._aliases: dict[str, str] = {}  # book -> version served as `latest`
        self._pointers: dict[str, str] = {}  # book -> version the store's `latest` names (last seen)
        self._cache: OrderedDict[tuple[str, str], LoadedAdapter] = OrderedDict()
        self._loading: dict[tuple[str, str], threading.Lock] = {}
        self._last_book_refresh: dict[str, float] = {}
        self._pointer_problems: dict[str, str] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Scan the store once (loading every book's latest), then keep watching it."""
        try:
            self.refresh()
        except StoreError as exc:
            log.warning("initial adapter scan failed; will retry", extra={"fields": {"error": str(exc)}})
        self._thread = threading.Thread(target=self._watch, name="adapter-watcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.watch_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception as exc:  # the watcher must survive store outages
                log.warning("adapter scan failed", extra={"fields": {"error": str(exc)}})

    # --- scanning -------------------------------------------------------------------------------

    def refresh(self, book_id: str | None = None) -> None:
        """Re-read the store (one book or all) and activate new `latest` versions."""
        if book_id is not None:
            layout.check_book_id(book_id)
        with self._refresh_lock:
            books = self._scan_versions(book_id)
            for book in books:
                self._last_book_refresh[book] = time.monotonic()
                try:
                    self._follow_pointer(book)
                except StoreError as exc:  # one unreachable object must not stall the other books
                    log.warning("adapter scan failed", extra={"fields": {"book": book, "error": str(exc)}})

    def _scan_versions(self, book_id: str | None) -> list[str]:
        prefix = layout.adapters_prefix(book_id) if book_id else layout.ADAPTERS
        books: set[str] = set()
        for key in self.store.list(prefix):
            book = layout.book_of_adapter_key(key)
            if book is None:
                continue
            books.add(book)
            complete = layout.version_of_meta_key(key)
            if complete is not None and complete not in self._versions:
                self._record(*complete)
        return sorted(books)

    def _record(self, book: str, version: str) -> VersionRecord | None:
        """Read a version's meta.json into a record; an unreadable one is recorded as rejected
        (once), a missing one (deleted meanwhile) is skipped."""
        try:
            meta = load_meta(self.store, book, version)
            error = (
                "" if (meta.book_id, meta.version) == (book, version) else "meta.json names another version"
            )
        except NotFound:
            return None
        except (TypeError, ValueError) as exc:
            job_id, part = layout.parse_version(version)
            meta = AdapterMeta(book, version, job_id, part, "")
            error = f"meta.json is unreadable: {exc}"
        if error:
            log.warning(
                "adapter rejected", extra={"fields": {"book": book, "version": version, "reason": error}}
            )
        with self._lock:
            return self._versions.setdefault((book, version), VersionRecord(meta, error=error))

    def _read_pointer(self, book: str) -> str | None:
        """The version the store's `latest` names; None when absent or unusable (logged once)."""
        try:
            target = load_latest(self.store, book)
            if target is None:
                return None
            problem = ""
        except (ValueError, InvalidArgument) as exc:
            problem, target = getattr(exc, "message", str(exc)), None
        if problem and self._pointer_problems.get(book) != problem:
            log.warning("unusable latest pointer", extra={"fields": {"book": book, "error": problem}})
        self._pointer_problems[book] = problem
        return target

    def _follow_pointer(self, book: str) -> None:
        target = self._read_pointer(book)
        if target is None:
            return
        with self._lock:
            if self._pointers.get(book) == target and book in self._aliases:
                return  # nothing new (a rejected target stays rejected: versions are immutable)
        record = self._versions.get((book, target)) or self._record(book, target)
        if record is None:
            return  # pointer ahead of a readable meta: try again next scan
        loaded = self._load(record) if not record.error else None  # a StoreError retries next scan
        with self._lock:
            self._pointers[book] = target
        if loaded is None:
            self._fallback_alias(book)
            return
        with self._lock:
            previous = self._aliases.get(book)
            self._aliases[book] = target
        if previous != target:
            log.info(
                "adapter alias flipped",
                extra={"fields": {"book": book, "latest": target, "previous": previous or "-"}},
            )
            if previous is not None:
                self.hooks.on_swap(book)

    def _fallback_alias(self, book: str) -> None:
        """The pointer's version is unusable: keep the current alias, or (fresh start) use the
        newest version that loads."""
        if book in self._aliases:
            return
        for record in _newest_first(self._book_records(book)):
            if not record.error and self._load(record) is not None:
                with self._lock:
                    self._aliases.setdefault(book, record.meta.version)
                log.info(
                    "serving an older adapter",
                    extra={"fields": {"book": book, "version": record.meta.version}},
                )
                return

    # --- loading and the cache ------------------------------------------------------------------

    def _load(self, record: VersionRecord) -> LoadedAdapter | None:
        """The version in memory (loading it if needed), or None if it is rejected."""
        key = (record.meta.book_id, record.meta.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None:
                return cached
            if record.error:
                return None
            started = time.monotonic()
            try:
                with tempfile.TemporaryDirectory(prefix="nc-adapter-") as tmp:
                    download_adapter(self.store, record.meta, Path(tmp))
                    weights = self.loader(Path(tmp), record.meta)
            except (AdapterRejected, FailedPrecondition, NotFound) as exc:
                record.error = str(exc) if isinstance(exc, AdapterRejected) else exc.message
                log.warning(
                    "adapter rejected",
                    extra={"fields": {"book": key[0], "version": key[1], "reason": record.error}},
                )
                self.hooks.on_load("rejected", time.monotonic() - started)
                return None
            seconds = time.monotonic() - started
            now = time.time()
            loaded = LoadedAdapter(record.meta, weights, loaded_at=now, last_used_at=now)
            record.rank, record.loaded_at = weights.rank, now
            with self._lock:
                self._cache[key] = loaded
                self._evict()
                self._loading.pop(key, None)
                held = len(self._cache)
            self.hooks.on_load("loaded", seconds)
            self.hooks.on_held(held)
            log.info(
                "adapter loaded",
                extra={
                    "fields": {
                        "book": key[0],
                        "version": key[1],
                        "rank": weights.rank,
                        "targets": ",".join(weights.target_modules),
                        "seconds": round(seconds, 3),
                    }
                },
            )
            return loaded

    def _evict(self) -> None:
        while len(self._cache) > self.max_adapters:
            (book, version), adapter = self._cache.popitem(last=False)
            log.info("adapter evicted (LRU)", extra={"fields": {"book": book, "version": version}})
            self.hooks.on_evict()
            self.hooks.on_drop(adapter)

    # --- resolving requests ---------------------------------------------------------------------

    def resolve(self, book_id: str, spec: str) -> LoadedAdapter | None:
        """The version a request for ``spec`` gets (None = the base model). Raises NotFound,
        FailedPrecondition (only rejected versions) or InvalidArgument."""
        spec = (spec or LATEST).strip()
        if spec == BASE:
            if book_id:
                layout.check_book_id(book_id)
            return None
        if not book_id:
            raise InvalidArgument("book_id is required unless adapter is 'base'")
        layout.check_book_id(book_id)
        if spec == LATEST:
            loaded = self._resolve_latest(book_id)
        elif layout.PART_ALIAS_RE.match(spec):
            loaded = self._resolve_part(book_id, int(layout.PART_ALIAS_RE.match(spec).group(1)))
        elif layout.VERSION_RE.match(spec):
            loaded = self._resolve_version(book_id, spec)
        else:
            raise InvalidArgument(
                f"invalid adapter {spec[:80]!r}: use 'latest', 'base', 'part-N' or a version id "
                "like 'j-0123456789ab-p03'"
            )
        now = time.time()
        loaded.last_used_at = now
        with self._lock:
            key = (loaded.book_id, loaded.version)
            if key in self._cache:
                self._cache.move_to_end(key)
            record = self._versions.get(key)
            if record is not None:
                record.last_used_at = now
        return loaded

    def _refresh_on_miss(self, book_id: str) -> None:
        """A request missed: re-read that book now (rate-limited, also for unknown books)."""
        now = time.monotonic()
        if now - self._last_book_refresh.get(book_id, 0.0) < ON_DEMAND_REFRESH_SECONDS:
            return
        if len(self._last_book_refresh) > 10_000:
            self._last_book_refresh.clear()
        self._last_book_refresh[book_id] = now
        self.refresh(book_id)

    def _resolve_latest(self, book_id: str) -> LoadedAdapter:
        for attempt in range(2):
            with self._lock:
                version = self._aliases.get(book_id)
            if version is not None:
                loaded = self._load(self._versions[(book_id, version)])
                if loaded is not None:
                    return loaded
            if attempt == 0:
                self._refresh_on_miss(book_id)
        records = self._book_records(book_id)
        if records:
            reasons = "; ".join(f"{r.meta.version}: {r.error}" for r in records if r.error)
            raise FailedPrecondition(f"book {book_id} has no usable adapter ({reasons or 'none loaded yet'})")
        raise NotFound(
            f"book {book_id} has no published adapter yet; train it first, or ask for adapter 'base'"
        )

    def _resolve_part(self, book_id: str, part: int) -> LoadedAdapter:
        for attempt in range(2):
            candidates = [r for r in self._book_records(book_id) if r.meta.part == part]
            for record in _newest_first(candidates):
                loaded = self._load(record)
                if loaded is not None:
                    return loaded
            if candidates:
                raise FailedPrecondition(f"every adapter of book {book_id} part {part} was rejected")
            if attempt == 0:
                self._refresh_on_miss(book_id)
        raise NotFound(f"book {book_id} has no published adapter for part {part}")

    def _resolve_version(self, book_id: str, version: str) -> LoadedAdapter:
        record = self._versions.get((book_id, version))
        if record is None:
            self._refresh_on_miss(book_id)
            record = self._versions.get((book_id, version)) or self._record_if_exists(book_id, version)
        if record is None:
            raise NotFound(f"adapter version {version} of book {book_id} not found")
        loaded = self._load(record)
        if loaded is None:
            raise FailedPrecondition(
                f"adapter version {version} of book {book_id} was rejected: {record.error}"
            )
        return loaded

    def _record_if_exists(self, book_id: str, version: str) -> VersionRecord | None:
        if not self.store.exists(layout.adapter_meta_key(book_id, version)):
            return None
        return self._record(book_id, version)

    def _book_records(self, book_id: str) -> list[VersionRecord]:
        with self._lock:
            return [r for (book, _), r in self._versions.items() if book == book_id]

    # --- inspection -----------------------------------------------------------------------------

    def statuses(self, book_id: str | None = None) -> list[AdapterStatus]:
        if book_id:
            layout.check_book_id(book_id)
        with self._lock:
            rows = []
            for (book, version), record in self._versions.items():
                if book_id and book != book_id:
                    continue
                loaded = self._cache.get((book, version))
                state = "rejected" if record.error else ("loaded" if loaded else "available")
                rows.append(
                    AdapterStatus(
                        meta=record.meta,
                        state=state,
                        latest=self._aliases.get(book) == version,
                        loaded_at=loaded.loaded_at if loaded else 0.0,
                        last_used_at=record.last_used_at,
                        rank=record.rank,
                        error=record.error,
                    )
                )
        return sorted(rows, key=lambda s: (s.meta.book_id, s.meta.published_at, s.meta.version))

    def alias(self, book_id: str) -> str | None:
        with self._lock:
            return self._aliases.get(book_id)

    def held(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self._cache)


def _newest_first(records: list[VersionRecord]) -> list[VersionRecord]:
    return sorted(records, key=lambda r: (r.meta.published_at, r.meta.version), reverse=True)

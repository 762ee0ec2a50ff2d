"""A job's event history as one process's WatchJob streams see it (the database keeps it all).

The coordinator fills it from the database, in sequence order, whichever replica committed
the events. In memory it is bounded: when it grows past ``MAX_EVENTS`` the oldest *progress*
events go first, so state changes, metrics and messages (a handful per part) survive the
longest. ``from_jsonl`` reads the ``events.jsonl`` an older coordinator kept in the store.

WatchJob streams wait on the log itself (:meth:`EventLog.wait_after`), not on the
coordinator's lock: a new event wakes only the streams of its job, they read it without
holding up the trainers' calls, and an idle stream sleeps until an event, its keepalive
timeout or :meth:`EventLog.wake` (its client left, the server is stopping).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from google.protobuf import json_format

from novelcrafter.v1 import jobs_pb2

MAX_EVENTS = 2000
TRIM_TO = 1500


class EventLog:
    def __init__(self, events: list[jobs_pb2.JobEvent] | None = None) -> None:
        self.events: list[jobs_pb2.JobEvent] = list(events or [])
        # Guards ``events``; a leaf lock (nothing else is taken while holding it), so the
        # coordinator may extend under its own lock while streams read without taking that.
        self._changed = threading.Condition(threading.Lock())

    def extend(self, events: list[jobs_pb2.JobEvent]) -> None:
        """Append events in sequence order; ones already here (read twice) are skipped."""
        with self._changed:
            last = self.events[-1].sequence if self.events else 0
            events = [event for event in events if event.sequence > last]
            if not events:
                return
            self.events.extend(events)
            if len(self.events) > MAX_EVENTS:
                self._trim()
            self._changed.notify_all()

    def after(self, sequence: int) -> list[jobs_pb2.JobEvent]:
        """Events with a sequence above ``sequence``, oldest first."""
        with self._changed:
            return self._after(sequence)

    def wait_after(
        self, sequence: int, timeout: float, stop: Callable[[], bool] = lambda: False
    ) -> list[jobs_pb2.JobEvent]:
        """Events after ``sequence``; if there are none, wait up to ``timeout`` seconds for one,
        unless ``stop()`` is already true. ``stop`` is checked under the log's lock, so a
        :meth:`wake` that follows setting what it reads is never missed."""
        with self._changed:
            pending = self._after(sequence)
            if pending or stop():
                return pending
            self._changed.wait(timeout)
            return self._after(sequence)

    def wake(self) -> None:
        """Wake every stream waiting on this log (they re-check whether to go on)."""
        with self._changed:
            self._changed.notify_all()

    def _after(self, sequence: int) -> list[jobs_pb2.JobEvent]:
        events = self.events
        if not events or events[-1].sequence <= sequence:
            return []
        lo, hi = 0, len(events)
        while lo < hi:  # sequences increase along the list
            mid = (lo + hi) // 2
            if events[mid].sequence <= sequence:
                lo = mid + 1
            else:
                hi = mid
        return events[lo:]

    @property
    def last_sequence(self) -> int:
        with self._changed:
            return self.events[-1].sequence if self.events else 0

    def _trim(self) -> None:
        excess = len(self.events) - TRIM_TO
        kept: list[jobs_pb2.JobEvent] = []
        for event in self.events:
            if excess > 0 and event.WhichOneof("event") == "progress":
                excess -= 1
                continue
            kept.append(event)
        if len(kept) > TRIM_TO:  # still too long: drop the oldest of any kind
            kept = kept[len(kept) - TRIM_TO :]
        self.events = kept

    @classmethod
    def from_jsonl(cls, text: str) -> EventLog:
        events = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                events.append(
                    json_format.ParseDict(json.loads(line), jobs_pb2.JobEvent(), ignore_unknown_fields=True)
                )
            except (ValueError, json_format.ParseError):
                continue  # a damaged line loses one event, not the history
        events.sort(key=lambda e: e.sequence)
        return cls(events)

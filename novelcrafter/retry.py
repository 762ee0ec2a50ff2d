"""Retries with exponential backoff: the one policy type and the policies the code uses.

A :class:`Backoff` is a policy (first delay, growth factor, cap, jitter); ``delays()``
yields the nominal waits of one retry sequence, ``wait_for(delay)`` the jittered wait to
actually sleep. :func:`retry` runs a call with a policy, a predicate for the errors worth
retrying and an optional deadline. Loops that do more between attempts (stop flags, a
reconnecting stream) iterate ``delays()`` themselves.

Every retry policy of the code base is declared below, with what it is for.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base``, ``base·factor``, ``base·factor²``, … at most ``cap`` seconds.

    ``jitter`` spreads each wait uniformly over ``delay × [1 − jitter, 1 + jitter)``, so
    many clients of one server do not retry in step.
    """

    base: float
    cap: float = math.inf
    factor: float = 2.0
    jitter: float = 0.0

    def delays(self) -> Iterator[float]:
        """The nominal delays of one retry sequence (endless; start a new one to reset)."""
        delay = self.base
        while True:
            yield delay
            delay = min(delay * self.factor, self.cap)

    def wait_for(self, delay: float) -> float:
        """The seconds to actually wait for a nominal ``delay`` (jitter applied)."""
        if not self.jitter:
            return delay
        return delay * (1.0 - self.jitter + 2.0 * self.jitter * random.random())


def retry(
    call: Callable[[], T],
    *,
    backoff: Backoff,
    retryable: Callable[[Exception], bool],
    deadline_seconds: float | None = None,
    on_retry: Callable[[int, Exception], None] | None = None,
    sleep: Callable[[float], object] = time.sleep,
) -> T:
    """``call()`` until it returns, retrying the exceptions ``retryable`` accepts.

    An error is raised as it is when it is not retryable, or when waiting the next delay
    would pass ``deadline_seconds`` (counted from the first attempt). ``on_retry(attempt,
    error)`` runs before each wait (attempts count from 1).
    """
    deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
    delays = backoff.delays()
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            delay = next(delays)
            if not retryable(exc) or (deadline is not None and time.monotonic() + delay > deadline):
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            sleep(backoff.wait_for(delay))


# --- the policies ---------------------------------------------------------------------------------

# Object store: a transient failure (store unreachable, throttled) is retried for
# ``Store.retry_seconds``; jittered, because every service shares the store.
STORE_BACKOFF = Backoff(base=0.2, cap=5.0, jitter=0.5)
# Following a job (WatchJob): reopening the stream while the coordinator is unreachable,
# for up to the follower's ``reconnect_seconds``; back to the first delay after an event.
WATCH_BACKOFF = Backoff(base=0.2, cap=5.0)
# Trainer: asking the coordinator for work while it is unreachable (until the worker stops).
CLAIM_BACKOFF = Backoff(base=1.0, cap=30.0)
# Trainer: renewing the lease right before publishing, for up to the lease's TTL (at least 10 s).
LEASE_CONFIRM_BACKOFF = Backoff(base=0.5, cap=5.0)
# Trainer: completing, failing or releasing a part while the coordinator is unreachable.
PART_OUTCOME_BACKOFF = Backoff(base=0.5, cap=10.0)
# Trainer: pushing an adapter to the Hugging Face Hub (``HubPusher.retries`` attempts); the
# first delay is ``HubPusher.backoff_seconds``.
HUB_PUSH_FACTOR = 2.0


def hub_push_backoff(backoff_seconds: float) -> Backoff:
    """The Hub push policy for a pusher's first delay."""
    return Backoff(base=backoff_seconds, factor=HUB_PUSH_FACTOR)

"""The one backoff policy type and retry helper (novelcrafter.retry)."""

from __future__ import annotations

import itertools
import random

import pytest

from novelcrafter import retry as retry_module
from novelcrafter.retry import (
    CLAIM_BACKOFF,
    LEASE_CONFIRM_BACKOFF,
    PART_OUTCOME_BACKOFF,
    STORE_BACKOFF,
    WATCH_BACKOFF,
    Backoff,
    hub_push_backoff,
    retry,
)


def first(backoff: Backoff, n: int) -> list[float]:
    return list(itertools.islice(backoff.delays(), n))


def test_delays_double_up_to_the_cap_and_restart_fresh() -> None:
    assert first(Backoff(0.2, cap=5.0), 7) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert first(Backoff(1.0, cap=30.0), 7) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert first(Backoff(2.0), 4) == [2.0, 4.0, 8.0, 16.0]  # no cap
    assert first(Backoff(1.0, factor=3.0, cap=10.0), 4) == [1.0, 3.0, 9.0, 10.0]
    backoff = Backoff(0.5, cap=10.0)
    used = backoff.delays()
    next(used), next(used)
    assert next(backoff.delays()) == 0.5  # a new sequence starts from the first delay


def test_the_declared_policies_keep_their_delays() -> None:
    assert first(STORE_BACKOFF, 7) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert first(WATCH_BACKOFF, 7) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    assert first(CLAIM_BACKOFF, 7) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert first(LEASE_CONFIRM_BACKOFF, 6) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert first(PART_OUTCOME_BACKOFF, 6) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert first(hub_push_backoff(2.0), 4) == [2.0, 4.0, 8.0, 16.0]
    assert STORE_BACKOFF.jitter == 0.5 and not WATCH_BACKOFF.jitter


def test_jitter_spreads_the_wait_around_the_delay() -> None:
    assert Backoff(1.0).wait_for(3.0) == 3.0
    waits = [Backoff(1.0, jitter=0.5).wait_for(2.0) for _ in range(500)]
    assert all(1.0 <= w < 3.0 for w in waits)
    assert min(waits) < 1.2 and max(waits) > 2.8


def test_jitter_matches_the_stores_former_formula() -> None:
    random.seed(7)
    expected = [0.4 * (0.5 + random.random()) for _ in range(5)]
    random.seed(7)
    assert [STORE_BACKOFF.wait_for(0.4) for _ in range(5)] == pytest.approx(expected)


def test_retry_retries_retryable_errors_with_the_delays() -> None:
    calls, slept, seen = [], [], []

    def call() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("down")
        return "ok"

    result = retry(
        call,
        backoff=Backoff(0.5, cap=1.0),
        retryable=lambda exc: isinstance(exc, ConnectionError),
        on_retry=lambda attempt, exc: seen.append((attempt, str(exc))),
        sleep=slept.append,
    )
    assert result == "ok" and len(calls) == 4
    assert slept == [0.5, 1.0, 1.0]
    assert seen == [(1, "down"), (2, "down"), (3, "down")]


def test_retry_raises_what_is_not_retryable_at_once() -> None:
    slept: list[float] = []

    def call() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        retry(call, backoff=Backoff(0.1), retryable=lambda exc: False, sleep=slept.append)
    assert slept == []


def test_retry_gives_up_when_the_next_wait_would_pass_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(retry_module.time, "monotonic", lambda: now[0])
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    def call() -> None:
        raise TimeoutError("slow")

    with pytest.raises(TimeoutError):
        retry(call, backoff=Backoff(1.0), retryable=lambda exc: True, deadline_seconds=6.0, sleep=sleep)
    # 1 + 2 = 3 s waited; the next wait (4 s) would end after the 6 s deadline.
    assert slept == [1.0, 2.0]

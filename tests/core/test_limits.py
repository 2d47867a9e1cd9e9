"""The token bucket over client frames, on a clock the test moves (pure, fuzzed)."""

from __future__ import annotations

from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

from pgws_sync._core.limits import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(min_value=0.5, max_value=500), burst=st.integers(min_value=1, max_value=200),
       gaps=st.lists(st.floats(min_value=0, max_value=2), max_size=400))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: int,
                                                       gaps: List[float]) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    start, taken = clock.now, 0
    for gap in gaps:
        clock.now += gap
        taken += bucket.take()
        assert taken <= burst + rate * (clock.now - start) + 1e-6


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=1, max_value=500), burst=st.integers(min_value=1, max_value=200),
       frames=st.integers(min_value=1, max_value=2000))
def test_a_client_within_the_rate_is_never_refused_nor_closed(rate: float, burst: int,
                                                             frames: int) -> None:
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    for _ in range(frames):
        clock.now += 1.001 / rate  # a hair under the rate: float sums need the margin
        assert bucket.take()
        assert not bucket.exhausted


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(min_value=1, max_value=100), burst=st.integers(min_value=1, max_value=100),
       speedup=st.floats(min_value=3, max_value=100))
def test_a_client_far_above_the_rate_is_exhausted_soon(rate: float, burst: int,
                                                      speedup: float) -> None:
    """Sending ``speedup`` times the rate: exhausted within the burst, twice over, and the
    strikes, whatever the numbers."""
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock)
    for sent in range(1, 100_000):
        clock.now += 1.0 / (rate * speedup)
        bucket.take()
        if bucket.exhausted:
            break
    assert bucket.exhausted
    assert sent <= (2 * burst + 2) * speedup / (speedup - 2) + 1

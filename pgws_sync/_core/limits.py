"""Per-connection limits on what a client sends: a token bucket over its frames."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """``rate`` frames a second, ``burst`` at once; used by one thread (the socket's writer).

    :meth:`take` spends a token, or counts a strike when there is none. Strikes
    drain at ``rate`` a second too, so :attr:`exhausted` becomes true only for a
    client that keeps sending faster than twice the rate for a while (more than
    ``burst`` strikes pending).
    """

    __slots__ = ("rate", "burst", "_tokens", "_strikes", "_at", "_clock")

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._strikes = 0.0
        self._at = clock()

    def take(self) -> bool:
        """Spend one token: True if there was one, else False (and one more strike)."""
        now = self._clock()
        gained = (now - self._at) * self.rate
        self._at = now
        self._tokens = min(float(self.burst), self._tokens + gained)
        self._strikes = max(0.0, self._strikes - gained)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._strikes += 1.0
        return False

    @property
    def exhausted(self) -> bool:
        """Whether the client has kept exceeding the rate (time to close it)."""
        return self._strikes > self.burst

"""Rate limits as plain values: a token bucket and a bounded table of them, `now` passed in.

Everything autonat exposes to the internet must stay bounded under a flood (new calls per source,
mappings per second towards the router, pool refills). These are the two devices all of those caps
use; they read no clock, so a test drives them with a fake one.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; starts full.

    A rate of 0 means "no limit" (every take succeeds), so a cap can be switched off in the config
    without a second code path.
    """

    rate: float
    burst: float
    tokens: float = math.nan
    updated: float = math.nan

    def __post_init__(self) -> None:
        if self.rate < 0 or (self.rate > 0 and self.burst < 1):
            raise ValueError("a token bucket needs rate >= 0 and burst >= 1")
        if math.isnan(self.tokens):
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if math.isnan(self.updated):
            self.updated = now
            return
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that goes back never takes tokens away
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now

    def available(self, now: float) -> float:
        if self.rate == 0:
            return math.inf
        self._refill(now)
        return self.tokens

    def take(self, now: float, count: float = 1.0) -> bool:
        """Take `count` tokens if there are that many; False (and nothing taken) if not."""
        if self.rate == 0:
            return True
        self._refill(now)
        if self.tokens + 1e-9 < count:
            return False
        self.tokens -= count
        return True

    def wait(self, now: float, count: float = 1.0) -> float:
        """Seconds until `count` tokens are there (0 if they are now); inf if `count` exceeds the burst."""
        if self.rate == 0:
            return 0.0
        self._refill(now)
        if count > self.burst:
            return math.inf
        missing = count - self.tokens
        return 0.0 if missing <= 1e-9 else missing / self.rate


class BucketTable:
    """One token bucket per key (a source address, say), at most `max_keys` of them.

    Past `max_keys` the least recently used bucket is forgotten. An attacker rotating through addresses
    can only make us forget buckets, never grow memory; a forgotten key starts again with a full bucket,
    which is the same as a new source's first calls, so forgetting never refuses anyone wrongly.
    """

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        TokenBucket(rate, burst)  # validates
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: collections.OrderedDict[Hashable, TokenBucket] = collections.OrderedDict()

    def take(self, key: Hashable, now: float, count: float = 1.0) -> bool:
        if self.rate == 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, count)

    def level(self, key: Hashable, now: float) -> float:
        """The tokens `key` has now (a key not in the table has a full bucket; no limit: inf). Reading it
        does not count as a use of the key."""
        if self.rate == 0:
            return math.inf
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else bucket.available(now)

    def __len__(self) -> int:
        return len(self._buckets)

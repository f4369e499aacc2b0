"""Retry timing shared by every loop that talks to something that can fail (API server, kernel, CA).

One implementation so every retry in the agent backs off the same way: exponential growth from a
base delay, capped, with full jitter so a fleet of agents restarting together does not retry in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from agent.settings import SettingsError


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniformly in [0, min(cap, base * 2**n)]."""

    base_s: float = 0.5
    """Upper bound of the first delay, in seconds."""

    cap_s: float = 30.0
    """No delay is longer than this, in seconds."""

    jitter: bool = True
    """Draw each delay uniformly below its bound; False gives the bound itself (for tests, logs)."""

    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    """Source of jitter; inject a seeded one for reproducible tests."""

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise SettingsError(f"backoff: need 0 < base_s <= cap_s, got {self.base_s} and {self.cap_s}")

    def bound(self, attempt: int) -> float:
        """The largest delay before retry number `attempt` (0 for the first retry)."""
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """The delay before retry number `attempt`."""
        bound = self.bound(attempt)
        return self.rng.uniform(0.0, bound) if self.jitter else bound

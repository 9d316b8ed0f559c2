"""Capped exponential backoff: the one retry-delay rule every loop in the library uses."""

from __future__ import annotations

import anyio

__all__ = ["Backoff"]


class Backoff:
    """Delays that start at ``initial`` and grow by ``multiplier`` up to ``maximum`` seconds.

    :meth:`next_delay` returns the delay to wait now and grows the next one;
    :meth:`reset` starts over (call it after a success). Not thread-safe:
    one loop owns one instance.
    """

    __slots__ = ("_delay", "initial", "maximum", "multiplier")

    def __init__(self, initial: float, maximum: float, multiplier: float = 2.0) -> None:
        if not 0 < initial <= maximum or multiplier < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and multiplier >= 1 "
                f"(got initial={initial}, maximum={maximum}, multiplier={multiplier})"
            )
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self._delay = initial

    def next_delay(self) -> float:
        """The delay to wait now; the following one is larger, up to ``maximum``."""
        delay = self._delay
        self._delay = min(delay * self.multiplier, self.maximum)
        return delay

    def reset(self) -> None:
        """Start again from ``initial``."""
        self._delay = self.initial

    async def wait(self) -> None:
        """Sleep for :meth:`next_delay` seconds (a cancellation point)."""
        await anyio.sleep(self.next_delay())

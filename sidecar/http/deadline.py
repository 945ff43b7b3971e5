"""One deadline with at most one lazily re-armed timer, shared by the public listener, the
upstream client and the admin listener.

Arming per request is an attribute write, not a new timer on the event loop: the scheduled
timer fires at the old time, sees the deadline has moved and reschedules itself for the new
one (the pattern of asyncio servers' keep-alive timers). Only an earlier deadline than the one
scheduled replaces the timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls ``on_expiry`` once the armed time passes, unless disarmed or re-armed first."""

    __slots__ = ("_loop", "_on_expiry", "_timer", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._timer: asyncio.TimerHandle | None = None
        self.when: float | None = None  # loop time; None: disarmed

    @property
    def armed(self) -> bool:
        return self.when is not None

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now (replacing any earlier arming)."""
        self.when = when = self._loop.time() + seconds
        timer = self._timer
        if timer is not None and timer.when() > when:
            timer.cancel()  # a shorter bound than the one scheduled
            timer = None
        if timer is None:
            self._timer = self._loop.call_at(when, self._check)

    def disarm(self) -> None:
        """No expiry until armed again; the scheduled timer, if any, lapses harmlessly."""
        self.when = None

    def cancel(self) -> None:
        """Disarm and drop the timer (the owner is going away)."""
        self.when = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        when = self.when
        if when is None:
            return
        if self._loop.time() < when:
            self._timer = self._loop.call_at(when, self._check)
            return
        self.when = None
        self._on_expiry()

"""A latest-value watch channel (DESIGN contracts 6-7), after tokio's ``sync::watch``.

One sender stores a single current value; any number of receivers observe
it. A receiver that falls behind skips intermediate values and sees the
newest one; memory never grows with backlog. Unlike tokio, a value sent
while no receiver exists is still stored, so late subscribers see it.

Guarantees:

- ``send`` costs O(1) plus one wake-up per receiver currently waiting;
  idle receivers cost nothing and there is no per-receiver queue.
- Cancelling a waiter loses nothing: a value it did not return stays unseen.
- Works on every anyio backend (asyncio and trio). Sender and receivers
  belong to one event loop thread; from other threads, go through
  ``anyio.from_thread``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

import anyio

from leaderwatch.errors import LeaderwatchError

__all__ = ["ChannelClosed", "WatchReceiver", "WatchSender", "watch_channel"]

T = TypeVar("T")


class ChannelClosed(LeaderwatchError):
    """The sender closed the channel (or this receiver was closed)."""


class _Shared(Generic[T]):
    __slots__ = (
        "closed",
        "no_receivers",
        "receivers",
        "value",
        "version",
        "waiters",
        "waiting",
    )

    def __init__(self, value: T) -> None:
        self.value = value
        self.version = 0
        self.closed = False
        self.receivers = 0
        # Created lazily by the first waiter, so sends with nobody waiting
        # allocate nothing and channels can be built outside an event loop.
        self.waiters: anyio.Event | None = None
        self.waiting = 0
        self.no_receivers: anyio.Event | None = None

    def notify(self) -> None:
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            self.waiting = 0
            waiters.set()

    def detach_receiver(self) -> None:
        self.receivers -= 1
        if self.receivers == 0 and self.no_receivers is not None:
            self.no_receivers.set()
            self.no_receivers = None


class WatchSender(Generic[T]):
    """The sending half: stores the current value and wakes waiting receivers.

    Sending on a closed sender raises :class:`ChannelClosed`. Used as an
    async context manager, it closes on exit; once garbage-collected, it
    counts as closed.
    """

    __slots__ = ("_shared",)

    def __init__(self, initial: T) -> None:
        self._shared: _Shared[T] = _Shared(initial)

    def _check_open(self) -> _Shared[T]:
        shared = self._shared
        if shared.closed:
            raise ChannelClosed("cannot send on a closed watch channel")
        return shared

    def send(self, value: T) -> None:
        """Store ``value`` and notify every receiver, even if it equals the current one."""
        shared = self._check_open()
        shared.value = value
        shared.version += 1
        shared.notify()

    def send_if_changed(self, value: T) -> bool:
        """Store and notify only if ``value != current``; return whether it did."""
        shared = self._check_open()
        if value == shared.value:
            return False
        shared.value = value
        shared.version += 1
        shared.notify()
        return True

    def send_replace(self, value: T) -> T:
        """Store ``value``, notify every receiver, and return the value it replaced."""
        shared = self._check_open()
        old = shared.value
        shared.value = value
        shared.version += 1
        shared.notify()
        return old

    def send_modify(self, modify: Callable[[T], object]) -> None:
        """Mutate the current value in place with ``modify``, then notify every receiver.

        For mutable values; immutable values are replaced with :meth:`send`.
        """
        shared = self._check_open()
        modify(shared.value)
        shared.version += 1
        shared.notify()

    def send_if_modified(self, modify: Callable[[T], bool]) -> bool:
        """Mutate the current value in place; notify only if ``modify`` returns ``True``.

        ``modify`` must return ``False`` only when it left the value unchanged:
        receivers are not told about a change it does not report.
        """
        shared = self._check_open()
        if not modify(shared.value):
            return False
        shared.version += 1
        shared.notify()
        return True

    def borrow(self) -> T:
        """The current value."""
        return self._shared.value

    def subscribe(self, *, distinct: bool = False) -> WatchReceiver[T]:
        """A new receiver for which the current value counts as already seen.

        With ``distinct=True``, ``async for`` over the receiver never yields a
        value equal to the one it yielded last (a late reader of ``A -> B -> A``
        gets ``A`` once). Use it for immutable values only: a value mutated in
        place always equals itself.
        """
        shared = self._shared
        return WatchReceiver(shared, shared.version, distinct)

    @property
    def receiver_count(self) -> int:
        """How many receivers are open (neither closed nor garbage-collected)."""
        return self._shared.receivers

    @property
    def is_closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._shared.closed

    def close(self) -> None:
        """Close the channel; idempotent. Receivers still get an unseen final value."""
        shared = self._shared
        if not shared.closed:
            shared.closed = True
            shared.notify()

    async def closed(self) -> None:
        """Return once no receiver remains open."""
        shared = self._shared
        while shared.receivers > 0:
            if shared.no_receivers is None:
                shared.no_receivers = anyio.Event()
            await shared.no_receivers.wait()
        await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        # A sender that is gone can never send again: wake its receivers.
        shared = getattr(self, "_shared", None)
        if shared is not None and not shared.closed:
            shared.closed = True
            shared.notify()

    async def __aenter__(self) -> WatchSender[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class WatchReceiver(Generic[T]):
    """The receiving half: observes the newest value, remembering which version it saw.

    ``async for value in receiver`` yields the current value at once, then the
    newest value after each change (skipping intermediates), and stops when
    the sender closes.
    """

    __slots__ = ("_distinct", "_open", "_seen", "_shared")

    def __init__(self, shared: _Shared[T], seen: int, distinct: bool = False) -> None:
        self._shared = shared
        self._seen = seen
        self._distinct = distinct
        self._open = True
        shared.receivers += 1

    def _live(self) -> _Shared[T]:
        if not self._open:
            raise ChannelClosed("this receiver was closed")
        return self._shared

    def borrow(self) -> T:
        """The current value; does not mark it seen."""
        return self._shared.value

    def borrow_and_update(self) -> T:
        """The current value, marking it seen."""
        shared = self._shared
        self._seen = shared.version
        return shared.value

    @property
    def is_closed(self) -> bool:
        """Whether the channel is closed for this receiver: no newer value can ever come.

        True once the sender was closed or garbage-collected, or this receiver
        was closed; it never becomes false again. The current value stays
        readable with :meth:`borrow`, and a final value this receiver has not
        seen is still returned by :meth:`changed` and by iteration.
        """
        return not self._open or self._shared.closed

    def has_changed(self) -> bool:
        """Whether a value newer than the last seen exists.

        Raises :class:`ChannelClosed` once the sender closed.
        """
        shared = self._live()
        if shared.closed:
            raise ChannelClosed("the watch channel's sender is closed")
        return self._seen != shared.version

    def mark_changed(self) -> None:
        """Make the current value count as unseen."""
        self._seen = self._shared.version - 1

    def mark_unchanged(self) -> None:
        """Make the current value count as seen."""
        self._seen = self._shared.version

    async def changed(self) -> None:
        """Wait for a value newer than the last seen, and mark it seen.

        Returns at once if one exists already, even after the sender closed;
        otherwise raises :class:`ChannelClosed` once the sender closed.
        Cancelling the wait leaves the newest value unseen.
        """
        # Checks inlined: this runs once per waiting receiver on every send.
        if not self._open:
            raise ChannelClosed("this receiver was closed")
        shared = self._shared
        while self._seen == shared.version:
            if shared.closed:
                raise ChannelClosed("the watch channel's sender is closed")
            waiters = shared.waiters
            if waiters is None:
                waiters = shared.waiters = anyio.Event()
            shared.waiting += 1
            try:
                await waiters.wait()
            except BaseException:
                # The last waiter to leave an unset event (cancelled) drops it:
                # an event belongs to one event loop, the channel may outlive it.
                if shared.waiters is waiters:
                    shared.waiting -= 1
                    if shared.waiting == 0:
                        shared.waiters = None
                raise
            if not self._open:
                raise ChannelClosed("this receiver was closed")
        self._seen = shared.version

    async def wait_for(self, predicate: Callable[[T], bool]) -> T:
        """Return the first value, starting with the current one, that satisfies ``predicate``.

        The returned value is marked seen. Raises :class:`ChannelClosed` only
        if the sender closed and its final value does not satisfy ``predicate``.
        """
        shared = self._live()
        while True:
            self._seen = shared.version
            value = shared.value
            if predicate(value):
                return value
            await self.changed()

    def clone(self) -> WatchReceiver[T]:
        """A new receiver that has seen exactly what this one has seen (``distinct`` too)."""
        return WatchReceiver(self._live(), self._seen, self._distinct)

    def close(self) -> None:
        """Detach from the channel; idempotent. Pending and later waits raise ``ChannelClosed``."""
        if self._open:
            self._open = False
            self._shared.detach_receiver()
            self._shared.notify()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            self._shared.detach_receiver()

    def __aiter__(self) -> _ReceiverIterator[T]:
        return _ReceiverIterator(self)


class _ReceiverIterator(Generic[T]):
    __slots__ = ("_first", "_last", "_receiver")

    def __init__(self, receiver: WatchReceiver[T]) -> None:
        self._receiver = receiver
        self._first = True
        self._last: T | None = None

    def __aiter__(self) -> _ReceiverIterator[T]:
        return self

    async def __anext__(self) -> T:
        receiver = self._receiver
        if self._first:
            self._first = False
            await anyio.lowlevel.checkpoint()
            value = self._last = receiver.borrow_and_update()
            return value
        while True:
            try:
                await receiver.changed()
            except ChannelClosed:
                raise StopAsyncIteration from None
            value = receiver.borrow()
            if not (receiver._distinct and value == self._last):
                self._last = value
                return value


def watch_channel(initial: T) -> tuple[WatchSender[T], WatchReceiver[T]]:
    """A new channel holding ``initial``, with its sender and one receiver.

    The receiver has seen ``initial``; ``async for`` over it still yields it first.
    """
    sender = WatchSender(initial)
    return sender, sender.subscribe()

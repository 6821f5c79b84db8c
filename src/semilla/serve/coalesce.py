"""CoalescedRead: one blocking read in a worker thread for any number of concurrent callers.

The accounts layer reads the store's auth generation before every request, so that a revoked
key or a demoted user is refused on the very next request. Done naively, a burst of 64 requests
starts 64 worker threads that all queue for the GIL behind the event loop: the loop then waits
up to the switch interval for each of them, and every other request on it (a `/health` poll)
waits 100 ms and more. Coalesced, the burst costs one read, or two.

The rule that keeps "applies on the next request" true: a caller never takes the result of a
read that had already begun when it arrived. Callers that arrive while a read runs all wait for
the one read started after it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from starlette.concurrency import run_in_threadpool

T = TypeVar("T")


class CoalescedRead(Generic[T]):
    """`await read()` runs `fn` in a thread, shared by every caller waiting for the same run."""

    def __init__(self, fn: Callable[[], T]):
        self.fn = fn
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Future | None = None  # the read under way
        self._next: asyncio.Future | None = None  # the read that starts when it ends

    async def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests, a restarted server): start afresh
            self._loop, self._running, self._next = loop, None, None
        if self._next is None:
            self._next = loop.create_task(self._read_after(self._running))
        return await asyncio.shield(self._next)  # one caller giving up cancels nobody's read

    async def _read_after(self, previous: asyncio.Future | None) -> T:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        if self._next is asyncio.current_task():  # (not if a new loop has started afresh since)
            self._running, self._next = self._next, None  # from here on, newcomers wait for the next
        return await run_in_threadpool(self.fn)

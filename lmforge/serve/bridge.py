"""The one crossing between the scheduler's thread and the server's event loop.

The scheduler emits events on its own thread; `Mailman` puts them on asyncio queues inside the
event loop, and `events` reads them back in a route, cancelling the sequences when the client
goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from lmforge.serve.scheduler import Event, SequenceRequest

DISCONNECT_CHECK = 0.5  # seconds between checks that a client is still there


class Mailman:
    """Carries events from the scheduler thread into an event loop, waking the loop once per batch, not per event.

    One decode step emits an event for every live sequence; a wake-up per event would cost the
    loop more than the step itself once a few clients stream at once.
    """

    _by_loop: dict[asyncio.AbstractEventLoop, Mailman] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.bag: list[tuple[asyncio.Queue, Event]] = []
        self.lock = threading.Lock()

    @classmethod
    def for_running_loop(cls) -> Mailman:
        loop = asyncio.get_running_loop()
        if loop not in cls._by_loop:
            cls._by_loop = {known: mailman for known, mailman in cls._by_loop.items() if not known.is_closed()}
            cls._by_loop[loop] = cls(loop)
        return cls._by_loop[loop]

    def deliver(self, queue: asyncio.Queue, event: Event) -> None:  # on the scheduler thread
        with self.lock:
            self.bag.append((queue, event))
            first = len(self.bag) == 1
        if first:
            self.loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:  # on the event loop
        with self.lock:
            bag, self.bag = self.bag, []
        for queue, event in bag:
            queue.put_nowait(event)


def mailbox() -> tuple[asyncio.Queue, Callable[[Event], None]]:
    """(a queue in the running event loop, the `emit` callback that fills it from the scheduler thread)."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    return queue, functools.partial(Mailman.for_running_loop().deliver, queue)


async def events(request: Request, sequences: list[SequenceRequest], queue: asyncio.Queue) -> AsyncIterator[Event]:
    """The sequences' events until each has finished; a client that goes away cancels them all.

    The client is checked at least every `DISCONNECT_CHECK` seconds, while events flow too: a
    non-streaming request is only read here (a stream's response also notices a hang-up itself).
    Events that piled up while the client was being served are merged per sequence, so a busy
    server sends fewer, longer chunks instead of falling further behind.
    """
    remaining = len(sequences)
    next_check = time.monotonic() + DISCONNECT_CHECK
    try:
        while remaining:
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    return
                next_check = time.monotonic() + DISCONNECT_CHECK
            try:
                first = (
                    queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), DISCONNECT_CHECK)
                )
            except TimeoutError:
                continue
            for event in _merged([first, *(queue.get_nowait() for _ in range(queue.qsize()))]):
                if event.error:
                    raise RuntimeError(event.error)
                if event.finish_reason:
                    remaining -= 1
                yield event
    finally:
        for sequence in sequences:  # a no-op for sequences that finished
            sequence.cancel()


def _merged(events: list[Event]) -> list[Event]:
    """One event per sequence: texts joined in order, the last event's ending kept."""
    merged: dict[int, Event] = {}
    for event in events:
        before = merged.get(event.index)
        merged[event.index] = dataclasses.replace(event, text=before.text + event.text) if before else event
    return list(merged.values())

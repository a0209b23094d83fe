"""Continuous batching for the server: a thread that runs the decoding engine over every live request.

Requests queue here from any thread (`submit`); between steps the thread admits waiting sequences
into free slots and removes cancelled ones (their client went away), then runs one engine step
(generate/engine.py: the one decoding loop, which owns the batch and its KV cache). Each sequence's
tokens become text through its own `TextStream` (generate/text.py), and the text goes back through
the sequence's `emit` callback, called on this thread (serve/bridge.py carries it to the event loop).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.data.tokenizer import Tokenizer
from lmforge.generate.constraints import TemplateConstraint
from lmforge.generate.engine import Engine, Request
from lmforge.generate.sampling import SamplingConfig
from lmforge.generate.text import TextStream
from lmforge.models.decoder import Decoder
from lmforge.models.layers import FEW_ROWS

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences are waiting than the queue holds; the client should retry later."""


@dataclass
class Event:
    """New text of one sequence; the last event of a sequence has `finish_reason` (or `error`) set."""

    index: int  # which choice of its request this sequence is
    text: str
    finish_reason: str | None = None  # "stop" or "length"
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class SequenceRequest:
    """One sequence to generate: prompt ids, sampling settings, stop strings, and where its text goes."""

    prompt_ids: list[int]
    sampling: SamplingConfig
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    index: int = 0
    constraint: TemplateConstraint | None = None  # a form the text must fill (generate/constraints.py)
    cancelled: bool = False  # set from any thread; the scheduler drops the sequence before its next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Live:
    request: SequenceRequest
    row: Request  # the engine's side of it
    text: TextStream


class Scheduler:
    """`compiled`: compiled decoding steps while at most FEW_ROWS sequences are live (`lmforge serve --compile`)."""

    def __init__(
        self, model: Decoder, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64, compiled: bool = False
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, not {max_batch} and {max_queue}")
        self.engine = Engine(model.eval(), tokenizer.pad_id, compiled, compiled_rows=FEW_ROWS)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        chat_end = {tokenizer.im_end_id} if tokenizer.im_end_id is not None else set()
        self.end_ids = frozenset({tokenizer.eos_id} | chat_end)
        self.waiting: deque[SequenceRequest] = deque()
        self.live: dict[int, _Live] = {}  # by id of the engine's Request
        self.steps = 0  # decode steps run
        self.largest_batch = 0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # The public side: any thread.

    def submit(self, requests: list[SequenceRequest]) -> None:
        """Queue sequences (all or none); QueueFull when the waiting queue has no room for them."""
        with self._condition:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting; the queue holds {self.max_queue}")
            self.waiting.extend(requests)
            self._condition.notify()

    @property
    def load(self) -> dict[str, int]:
        return {"live": len(self.live), "waiting": len(self.waiting), "max_batch": self.max_batch}

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmforge-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self.waiting and not self.live:
                    self._condition.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a bug must not leave every client waiting forever
                log.exception("generation failed")
                self._fail_live(f"generation failed: {error}")

    # The scheduler's thread.

    def step(self) -> None:
        """Drop cancelled sequences, admit waiting ones, then decode one token for every live sequence."""
        self._remove([live for live in self.live.values() if live.request.cancelled])
        self._admit()
        if not self.live:
            return
        self.largest_batch = max(self.largest_batch, len(self.live))
        tokens = self.engine.step()
        self.steps += 1
        for token in tokens:
            live = self.live[id(token.request)]
            piece = live.text.feed(token)
            if not live.text.finished:
                self._emit(live, Event(live.request.index, piece))
                continue
            if token.finish_reason is None:  # a stop string: the engine does not know it
                self.engine.remove([live.row])
            del self.live[id(live.row)]
            self._emit(live, Event(live.request.index, piece, live.text.finish_reason, live.text.token_count))

    def _admit(self) -> None:
        with self._condition:
            newcomers = []
            while self.waiting and len(self.live) + len(newcomers) < self.max_batch:
                request = self.waiting.popleft()
                if not request.cancelled:
                    newcomers.append(request)
        if not newcomers:
            return
        admitted = [_Live(request, self._row(request), self._text(request)) for request in newcomers]
        self.engine.add([live.row for live in admitted])
        self.live.update((id(live.row), live) for live in admitted)

    def _row(self, request: SequenceRequest) -> Request:
        """The engine's side of a sequence (a constrained one gets its own cursor through the form)."""
        cursor = request.constraint.start() if request.constraint is not None else None
        return Request(request.prompt_ids, request.sampling, self.end_ids, constraint=cursor)

    def _text(self, request: SequenceRequest) -> TextStream:
        return TextStream(self.tokenizer, request.stop, self.end_ids)

    def _remove(self, gone: list[_Live]) -> None:
        self.engine.remove([live.row for live in gone])
        for live in gone:
            del self.live[id(live.row)]

    def _emit(self, live: _Live, event: Event) -> None:
        try:
            live.request.emit(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            log.exception("could not deliver generated text")
            live.request.cancel()

    def _fail_live(self, message: str) -> None:
        for live in self.live.values():
            self._emit(live, Event(live.request.index, "", error=message))
        self.live = {}
        self.engine.clear()

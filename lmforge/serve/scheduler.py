"""Continuous batching: one model loop decodes every live request together, one token per row per step.

Requests join and leave between steps. Live sequences share one left-padded KV
cache whose rows all end in the same column: each step appends one token to
every row; newcomers are prefilled together and slotted in right-aligned; a
finished or cancelled sequence (its client went away) is dropped at the next
step, which frees its slot. Leading columns that are padding in every row are
then trimmed, so the cache is never longer than the longest live sequence. The
attention mask keeps padding invisible and positions count real tokens only,
so every sequence decodes as it would alone.

The loop runs in its own thread. `submit` may be called from any thread; text
comes back through each sequence's `emit` callback, called on the loop thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.generate.decode import left_pad
from lmforge.generate.sampling import SamplingConfig, next_tokens_per_row, prompt_tokens_seen
from lmforge.lm import TextStream
from lmforge.models.layers import KVCache

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More sequences are waiting than the engine's queue holds; the client should retry later."""


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
    cancelled: bool = False  # set from any thread; the engine drops the sequence at its next step

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Live:
    request: SequenceRequest
    text: TextStream
    budget: int  # new tokens it may still take in all: max_tokens, or what the context leaves
    generator: torch.Generator | None


class Engine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, not {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = model.config.max_position_embeddings
        self.end_ids = {tokenizer.eos_id} | ({tokenizer.im_end_id} if tokenizer.im_end_id is not None else set())
        self.device = model.embed_tokens.weight.device
        self.waiting: deque[SequenceRequest] = deque()
        self.live: list[_Live] = []
        self.cache: KVCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # (B, L), 1 = real token
        self.seen = torch.zeros(0, model.config.vocab_size, dtype=torch.bool, device=self.device)  # (B, V)
        self.logits = torch.zeros(0, model.config.vocab_size, device=self.device)  # (B, V) next-token logits
        self.steps = 0  # decode steps run
        self.largest_batch = 0
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the public side: any thread ---

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
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
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

    # --- the model loop ---

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting sequences, then choose one token for every live sequence and feed it back."""
        self._keep([row for row, live in enumerate(self.live) if not live.request.cancelled])
        self._admit()
        if not self.live:
            return
        self.largest_batch = max(self.largest_batch, len(self.live))
        tokens = next_tokens_per_row(
            self.logits,
            [live.request.sampling for live in self.live],
            self.seen,
            [live.generator for live in self.live],
        )
        self.steps += 1
        keep = []
        for row, (live, token) in enumerate(zip(self.live, tokens.tolist())):
            piece = live.text.push(token)
            if not live.text.finished and live.text.token_count >= live.budget:
                piece += live.text.finish()
            if live.text.finished:
                self._emit(live, Event(live.request.index, piece, live.text.finish_reason, live.text.token_count))
            else:
                self._emit(live, Event(live.request.index, piece))
                keep.append(row)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        tokens = tokens[index]
        self._keep(keep)
        if not self.live:
            return
        self.seen.scatter_(1, tokens[:, None], True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=1)
        # NOTE: with no padding left, no mask at all lets SDPA take its fastest path.
        mask = None if bool(self.mask.all()) else self.mask
        self.logits = self.model(tokens[:, None], attention_mask=mask, cache=self.cache)[:, -1].float()

    def _admit(self) -> None:
        with self._condition:
            newcomers = []
            while self.waiting and len(self.live) + len(newcomers) < self.max_batch:
                request = self.waiting.popleft()
                if not request.cancelled:
                    newcomers.append(request)
        if not newcomers:
            return
        prompts = [request.prompt_ids for request in newcomers]
        longest = max(len(prompt) for prompt in prompts)
        if longest >= self.context or min(len(prompt) for prompt in prompts) == 0:
            raise ValueError("every prompt needs between 1 and context - 1 tokens; the server checks this first")
        input_ids, mask = left_pad(prompts, self.tokenizer.pad_id, self.device)
        cache = self.model.new_cache(len(prompts), longest)
        logits = self.model(input_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
        seen = prompt_tokens_seen(input_ids, mask, self.seen.shape[1])
        mask = mask if mask is not None else torch.ones_like(input_ids)
        self._merge(cache, mask, logits, seen)
        for request in newcomers:
            sampling = request.sampling
            generator = None
            if sampling.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(sampling.seed % 2**64)
            budget = min(sampling.max_new_tokens, self.context - len(request.prompt_ids))
            self.live.append(_Live(request, TextStream(self.tokenizer, request.stop, self.end_ids), budget, generator))

    def _merge(self, cache: KVCache, mask: torch.Tensor, logits: torch.Tensor, seen: torch.Tensor) -> None:
        """Append freshly prefilled rows to the batch, right-aligned with the rows already there."""
        old_rows, old_length = self.mask.shape
        new_rows, new_length = mask.shape
        length = max(old_length, new_length)
        merged = self.model.new_cache(old_rows + new_rows, self.context)
        merged.length = length
        merged_mask = torch.zeros(old_rows + new_rows, length, dtype=torch.long, device=self.device)
        parts = ((slice(0, old_rows), self.cache, self.mask), (slice(old_rows, None), cache, mask))
        for rows, source, source_mask in parts:
            width = source_mask.shape[1]
            if source is not None and width:
                merged.keys[:, rows, :, length - width : length] = source.keys[:, :, :, :width]
                merged.values[:, rows, :, length - width : length] = source.values[:, :, :, :width]
            merged_mask[rows, length - width :] = source_mask
        self.cache, self.mask = merged, merged_mask
        self.logits = torch.cat([self.logits, logits])
        self.seen = torch.cat([self.seen, seen])

    def _keep(self, rows: list[int]) -> None:
        """Keep only these live rows, then trim leading columns that are padding in every remaining row."""
        if len(rows) == len(self.live):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.live = [self.live[row] for row in rows]
        self.mask, self.seen, self.logits = self.mask[index], self.seen[index], self.logits[index]
        if not rows:
            self.cache = None
            self.mask = self.mask[:, :0]
            return
        self.cache.reorder(index)
        padding = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        if padding:
            length = self.cache.length
            self.cache.keys[:, :, :, : length - padding] = self.cache.keys[:, :, :, padding:length].clone()
            self.cache.values[:, :, :, : length - padding] = self.cache.values[:, :, :, padding:length].clone()
            self.cache.length = length - padding
            self.mask = self.mask[:, padding:]

    def _emit(self, live: _Live, event: Event) -> None:
        try:
            live.request.emit(event)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            log.exception("could not deliver generated text")
            live.request.cancel()

    def _fail_live(self, message: str) -> None:
        for live in self.live:
            self._emit(live, Event(live.request.index, "", error=message))
        self._keep([])

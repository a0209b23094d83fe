"""The decoding loop for decoders: token ids in, token ids out, with rows joining and leaving between steps.

Every caller decodes through `Engine`: `LM.generate` / `LM.chat` add all their rows at once and
step until they are done; the server adds requests as they arrive and removes the ones whose client
went away (continuous batching). Live rows share one left-padded `KVCache` whose rows all end in the
same column (models/cache.py owns merging, dropping and trimming rows). Each step chooses one token
per row, each row with its own sampling settings (generate/sampling.py) and, for a constrained row, only among the
ids its constraint allows (generate/constraints.py), and feeds the tokens of the rows still running back through
the model. Position ids count real tokens only and the attention mask
hides padding, so every row decodes as it would alone.

With `compiled=True`, steps run as `torch.compile`d graphs (generate/compiled.py) while at most
`compiled_rows` rows are live; a finished row then stays in the batch as a dead row (its output
unread) until rows join, so the batch keeps its shape and its compiled graph. Prefill stays eager.
Text is not this module's: generate/text.py turns the ids into text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import UserError
from lmforge.generate.compiled import CompiledDecoding, check_compilable
from lmforge.generate.constraints import Cursor, mask_logits
from lmforge.generate.sampling import SamplingConfig, next_tokens_per_row, prompt_tokens_seen
from lmforge.models.cache import KVCache
from lmforge.models.decoder import Decoder


@dataclass(eq=False)
class Request:
    """One sequence to decode. It ends after one of `stop_ids` ("stop") or after `budget` tokens ("length")."""

    prompt_ids: Sequence[int]
    sampling: SamplingConfig
    stop_ids: frozenset[int] = frozenset()
    # Rows that pass the same generator draw together from it (LM's seeded batch); by default a seeded
    # request gets its own, so its tokens do not depend on its neighbours.
    generator: torch.Generator | None = None
    # A constrained row (generate/constraints.py): only the ids its cursor allows are sampled.
    constraint: Cursor | None = None
    budget: int = 0  # new tokens it may take: max_new_tokens, or what the context leaves (set by `Engine.add`)
    generated: int = 0


@dataclass
class Token:
    """One row's token of one step; `finish_reason` is set on its last ("stop" or "length")."""

    request: Request
    token_id: int | None  # None only for a request that was given no room for any token
    finish_reason: str | None = None


@dataclass
class Generation:
    token_ids: list[int]  # new tokens, without the stop token
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens or the context ran out)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T), attention_mask (B, T) or None when no row needs padding)."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, longest - len(prompt) :] = 1
    if all(len(prompt) == longest for prompt in prompts):
        return input_ids.to(device), None
    return input_ids.to(device), attention_mask.to(device)


@dataclass(eq=False)
class Engine:
    """The live rows of one decoder and their KV cache. Call `add`, `step` and `remove` from one thread."""

    model: Decoder
    pad_id: int = 0
    compiled: bool = False
    compiled_rows: int | None = None  # compiled steps while at most this many rows are live (None: any number)
    rows: list[Request | None] = field(default_factory=list)  # None: a dead row a compiled batch carries
    cache: KVCache | None = None
    logits: torch.Tensor | None = None  # (B, V) float32, each row's next-token logits
    seen: torch.Tensor | None = None  # (B, V) bool, the tokens each row holds (for the repetition penalty)
    compiled_step: CompiledDecoding | None = None  # while it is set, it holds the rows' cache
    unstarted: list[Request] = field(default_factory=list)  # requests with no room for a token

    def __post_init__(self) -> None:
        if not isinstance(self.model, Decoder):
            raise UserError(f"the decoding engine runs decoders; this is a {type(self.model).__name__}")
        if self.compiled:
            check_compilable(self.model)
        self.context = self.model.config.max_position_embeddings
        self.device = self.model.embed_tokens.weight.device

    @property
    def live(self) -> list[Request]:
        return [request for request in self.rows if request is not None]

    def has_work(self) -> bool:
        return bool(self.live or self.unstarted)

    @torch.inference_mode()
    def add(self, requests: Iterable[Request]) -> None:
        """Prefill these requests together and join them to the live rows (eagerly, between steps)."""
        requests = list(requests)
        for request in requests:
            self._prepare(request)
        self.unstarted += [request for request in requests if request.budget == 0]
        requests = [request for request in requests if request.budget > 0]
        if not requests:
            return
        prompts = [request.prompt_ids for request in requests]
        input_ids, attention_mask = left_pad(prompts, self.pad_id, self.device)  # (N, T)
        cache = self.model.new_cache(len(prompts), input_ids.shape[1] + max(r.budget for r in requests))
        cache.pad_left([len(prompt) for prompt in prompts])
        logits = self.model(input_ids, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]  # (N, V)
        seen = prompt_tokens_seen(input_ids, attention_mask, self.model.config.vocab_size)  # (N, V)
        if not self.live:
            self._reset()
        self._uncompile()  # the rows change: the compiled batch's cache comes back to be merged
        if self.cache is None:
            self.cache, self.logits, self.seen = cache, logits.float(), seen
        else:
            self._drop([row for row, request in enumerate(self.rows) if request is None])
            length = max(self.cache.length, cache.length)
            self.cache = self.cache.merge(cache, length + self._remaining(self.live + requests))
            self.logits = torch.cat([self.logits, logits.float()])
            self.seen = torch.cat([self.seen, seen])
        self.rows += requests

    def _prepare(self, request: Request) -> None:
        """Check the prompt's length; set the request's budget and, when it is seeded, its own generator."""
        if not request.prompt_ids:
            raise ValueError("every prompt needs at least one token")
        if len(request.prompt_ids) >= self.context:
            raise ValueError(
                f"a prompt of {len(request.prompt_ids)} tokens leaves no room in the model's context of {self.context}"
            )
        request.budget = min(request.sampling.max_new_tokens, self.context - len(request.prompt_ids))
        if request.generator is None and request.sampling.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(request.sampling.seed % 2**64)

    def remove(self, requests: Iterable[Request]) -> None:
        """Stop decoding these requests (their client went away, or their text hit a stop string)."""
        gone = set(map(id, requests))
        rows = [row for row, request in enumerate(self.rows) if request is not None and id(request) in gone]
        self.unstarted = [request for request in self.unstarted if id(request) not in gone]
        self._finish(rows)

    @torch.inference_mode()
    def step(self) -> list[Token]:
        """Choose one token for every live row; feed those of the rows still running back through the model."""
        out = [Token(request, None, "length") for request in self.unstarted]
        self.unstarted = []
        live = [row for row, request in enumerate(self.rows) if request is not None]
        if not live:
            return out
        requests = [self.rows[row] for row in live]
        tokens = self._sample(live, requests)  # (B,)
        finished = []
        values = tokens.tolist()
        for row, request in zip(live, requests):
            token = values[row]
            request.generated += 1
            if request.constraint is not None:
                request.constraint.advance(token)
            reason = "stop" if token in request.stop_ids else "length" if request.generated >= request.budget else None
            out.append(Token(request, token, reason))
            if reason:
                finished.append(row)
        kept = self._finish(finished)
        if self.live:
            self._forward(tokens if len(kept) == len(tokens) else tokens[kept])
        return out

    def _sample(self, live: list[int], requests: list[Request]) -> torch.Tensor:
        """A token for every row (B,): sampled for the live ones, padding for the dead rows of a compiled batch."""
        configs, generators = [r.sampling for r in requests], [r.generator for r in requests]
        cursors = [r.constraint for r in requests]
        if len(live) == len(self.rows):  # no dead rows: no gathering and scattering
            return next_tokens_per_row(mask_logits(self.logits, cursors), configs, self.seen, generators)
        index = torch.tensor(live, device=self.device)
        tokens = torch.full((len(self.rows),), self.pad_id, dtype=torch.long, device=self.device)
        logits = mask_logits(self.logits[index], cursors)  # (live, V)
        tokens[index] = next_tokens_per_row(logits, configs, self.seen[index], generators)
        return tokens

    def _finish(self, rows: list[int]) -> list[int]:
        """Retire these rows; return the row indices that stay in the batch (dead rows of a compiled batch too)."""
        if self.compiled_step is not None and len(rows) < len(self.live):
            for row in rows:
                self.rows[row] = None  # kept, so the compiled graph keeps its batch size
            return list(range(len(self.rows)))
        self._uncompile()
        gone = set(rows) | {row for row, request in enumerate(self.rows) if request is None}
        self._drop(sorted(gone))
        return [row for row in range(len(self.rows) + len(gone)) if row not in gone]

    def _drop(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        kept = torch.tensor([row for row in range(len(self.rows)) if row not in gone], device=self.device)
        self.rows = [request for row, request in enumerate(self.rows) if row not in gone]
        if not self.rows:
            return self._reset()
        self.cache.drop(rows)
        self.logits, self.seen = self.logits[kept], self.seen[kept]

    def clear(self) -> None:
        """Drop every request (after a failed step, whose state cannot be trusted)."""
        self.unstarted = []
        self._reset()

    def _reset(self) -> None:
        self.rows, self.cache, self.logits, self.seen, self.compiled_step = [], None, None, None, None

    def _forward(self, tokens: torch.Tensor) -> None:
        """tokens (B,), one per row -> the next logits (B, V), written into the cache."""
        self.seen.scatter_(1, tokens[:, None], True)
        if self.compiled and (self.compiled_rows is None or len(self.rows) <= self.compiled_rows):
            if self.compiled_step is None:
                # +1: the column of the token fed now
                needed = self.cache.length + self._remaining(self.live) + 1
                self.compiled_step, self.cache = CompiledDecoding(self.model, self.cache, needed), None
            self.logits = self.compiled_step(tokens).float()
            return
        self._uncompile()
        attention_mask = self.cache.attention_mask(new_tokens=1)  # (B, length + 1) or None: no padding
        self.logits = self.model(tokens[:, None], attention_mask=attention_mask, cache=self.cache)[:, -1].float()

    def _uncompile(self) -> None:
        """Take the rows' cache back from the compiled steps (to change its rows, or to step eagerly)."""
        if self.compiled_step is not None:
            self.cache = self.compiled_step.cache(self.compiled_step.static.max_length)
            self.compiled_step = None

    @staticmethod
    def _remaining(requests: Iterable[Request | None]) -> int:
        """The most tokens any of these requests may still take."""
        return max((r.budget - r.generated for r in requests if r is not None), default=0)


def generate_ids(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    compiled: bool = False,
) -> list[Generation]:
    """Decode a batch of prompts to the end: the new tokens of every row and why each row stopped.

    A seeded `config` draws every row from one generator, so a batch repeats exactly.
    """
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    engine = Engine(model, pad_id, compiled)
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=engine.device).manual_seed(config.seed % 2**64)
    requests = [Request(prompt, config, frozenset(stop_ids), generator) for prompt in prompts]
    engine.add(requests)
    outputs = {id(request): Generation([], "length") for request in requests}
    while engine.has_work():
        for token in engine.step():
            output = outputs[id(token.request)]
            if token.finish_reason == "stop":
                output.finish_reason = "stop"
            elif token.token_id is not None:
                output.token_ids.append(token.token_id)
    return [outputs[id(request)] for request in requests]

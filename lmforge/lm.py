"""A trained model with its tokenizer: text in, text out. `lmforge.load(run_dir)` returns one.

Prompts and chat templates are encoded here; the decoding loop is generate/engine.py's (token ids in,
token ids out) and the text edge, detokenizing and stop strings, is generate/text.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.config import from_dict
from lmforge.data.chat import Message, check_control_tokens, check_messages, check_tools, truncate_chat
from lmforge.data.poetry import form_named, rhyme_group
from lmforge.data.tokenizer import Tokenizer
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.explain.explain import explain as explain_text
from lmforge.generate.compiled import check_compilable
from lmforge.generate.constraints import TemplateConstraint, TokenTable, check_room
from lmforge.generate.engine import Engine, Request
from lmforge.generate.sampling import SamplingConfig
from lmforge.generate.text import TextStream
from lmforge.models import load_model
from lmforge.models.lora import load_adapter, merge_lora
from lmforge.run_folder import RunFolder, read_json, write_json


def save_generation_config(folder: str | Path, sampling: SamplingConfig, tokenizer: Tokenizer) -> None:
    """Sampling defaults in Hugging Face's `generation_config.json` shape, so they travel with the model."""
    write_json(
        RunFolder(folder).generation,
        {
            "do_sample": sampling.temperature > 0,
            **{k: v for k, v in dataclasses.asdict(sampling).items() if k != "seed"},
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id,
        },
    )


def read_generation_config(folder: str | Path) -> SamplingConfig:
    path = RunFolder(folder).generation
    if not path.is_file():
        return SamplingConfig()
    saved = read_json(path)
    known = {field.name for field in dataclasses.fields(SamplingConfig)}
    return from_dict(SamplingConfig, {k: v for k, v in saved.items() if k in known}, "generation")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop": end of sequence or a stop string; "length": out of tokens or context
    prompt_tokens: int
    completion_tokens: int


class LM:
    """A model and its tokenizer. `compiled`: decode with `torch.compile`d steps (generate/compiled.py): faster
    after a one-off compile per batch size, for decoders; the model's weights must not change afterwards.
    `labels`: a classifier's class names, in the order of its outputs (task.json's)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        defaults: SamplingConfig | None = None,
        compiled: bool = False,
        labels: Sequence[str] | None = None,
    ) -> None:
        if compiled:
            check_compilable(model)  # now, not at the first answer
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.defaults = defaults or SamplingConfig()
        self.compiled = compiled
        self._token_table: TokenTable | None = None
        self.labels = list(labels) if labels is not None else None

    def explain(self, text: str, *, target: str | None = None, continuation: str | None = None, **options):
        """Attention maps, attributions and (decoders) the logit lens of one text, as an `Explanation` of arrays.

        target: a classifier's label to explain (default: its prediction); continuation: the text whose
        log-probability a decoder or encoder-decoder explains (default: its own greedy answer). Options:
        steps (integrated-gradient steps, 64), max_new_tokens, top_k (logit lens). `.save(folder)` draws it.
        """
        return explain_text(self, text, target=target, continuation=continuation, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sampling(self, **overrides) -> SamplingConfig:
        """The saved defaults with the given (non-None) values replaced; bad values are UserErrors."""
        values = dataclasses.asdict(self.defaults)
        values.update({key: value for key, value in overrides.items() if value is not None})
        try:
            return SamplingConfig(**values)
        except (TypeError, ValueError) as error:
            raise UserError(str(error)) from None

    def form_constraint(self, form: str, rhyme: bool = False) -> TemplateConstraint:
        """A constraint that makes every output a poem of `form` (五言绝句, 7-quatrain, ...), rhyming when asked."""
        poem = form_named(form)
        if self._token_table is None:
            self._token_table = TokenTable(self.tokenizer.token_bytes())
        return TemplateConstraint(self._token_table, poem.template(), self.tokenizer.eos_id,
                                  poem.rhyme_slots() if rhyme else (), rhyme_group if rhyme else None)  # fmt: skip

    def encode_prompt(self, prompt: str) -> list[int]:
        # Training documents start with <bos>, so a prompt does too.
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        stream: bool = False,
        stop: Sequence[str] | str | None = None,
        constraint: TemplateConstraint | None = None,
        **sampling,
    ) -> str | list[str] | Iterator[str]:
        """Continue one prompt (-> str, or an iterator of text pieces with `stream=True`) or many (-> list[str]).

        Sampling keywords: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty, seed.
        `constraint` (e.g. `form_constraint("五言绝句")`) allows only text that fills its form.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if stream:
            if not single:
                raise UserError("stream=True takes one prompt, not a list")
            config = self.sampling(**sampling)
            pieces = self._pieces(self._encode_prompts(prompts), stop, config, [], constraint=constraint)
            return (piece[0] for piece in pieces)
        completions = self.complete(prompts, stop=stop, constraint=constraint, **sampling)
        texts = [completion.text for completion in completions]
        return texts[0] if single else texts

    def complete(
        self,
        prompts: Sequence[str],
        *,
        stop: Sequence[str] | str | None = None,
        constraint: TemplateConstraint | None = None,
        **sampling,
    ) -> list[Completion]:
        return self.complete_ids(self._encode_prompts(prompts), stop=stop, constraint=constraint, **sampling)

    def complete_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        stop: Sequence[str] | str | None = None,
        constraint: TemplateConstraint | None = None,
        **sampling,
    ) -> list[Completion]:
        """Like `complete`, for prompts already encoded (ones that hold special tokens, such as fill-in-the-middle)."""
        ids = [list(prompt) for prompt in prompt_ids]
        return self._collect(ids, stop, self.sampling(**sampling), constraint=constraint)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        stream: bool = False,
        stop: Sequence[str] | str | None = None,
        tools: list[dict] | None = None,
        **sampling,
    ) -> str | Iterator[str]:
        """The assistant's reply to a conversation (a list of {role, content}), or an iterator of its pieces.

        The oldest turns are dropped (never the system message) so that the history
        plus `max_new_tokens` fits the model's context. With `tools` (OpenAI-style signatures) the reply
        may be tool calls; `lmforge.data.chat.parse_reply` reads them.
        """
        config = self.sampling(**sampling)
        prompt_ids = [self.encode_chat_prompt(messages, config.max_new_tokens, tools)]
        stop_ids = [self.tokenizer.im_end_id]
        if stream:
            return (pieces[0] for pieces in self._pieces(prompt_ids, stop, config, [], stop_ids))
        return self._collect(prompt_ids, stop, config, stop_ids)[0].text

    def chat_complete(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        stop: Sequence[str] | str | None = None,
        tools: Sequence[list[dict] | None] | None = None,
        **sampling,
    ) -> list[Completion]:
        """Replies to many conversations, decoded as one batch; `tools`: each conversation's signatures, if any."""
        config = self.sampling(**sampling)
        tools = list(tools) if tools is not None else [None] * len(conversations)
        prompt_ids = [
            self.encode_chat_prompt(messages, config.max_new_tokens, offered)
            for messages, offered in zip(conversations, tools)
        ]
        return self._collect(prompt_ids, stop, config, [self.tokenizer.im_end_id])

    def encode_chat_prompt(
        self, messages: Sequence[Message], max_new_tokens: int, tools: list[dict] | None = None
    ) -> list[int]:
        """The conversation with the assistant's turn opened, cut to leave `max_new_tokens` of context."""
        return self.fit_chat(messages, max_new_tokens, tools)[1]

    def fit_chat(
        self, messages: Sequence[Message], max_new_tokens: int, tools: list[dict] | None = None
    ) -> tuple[list[Message], list[int]]:
        """(the messages kept, their prompt ids): oldest turns dropped so `max_new_tokens` still fit the context."""
        messages = check_messages(list(messages))
        check_control_tokens(self.tokenizer, messages)
        context = self.model.config.max_position_embeddings
        budget = context - min(max_new_tokens, context // 2)
        kept, tokens = truncate_chat(self.tokenizer, messages, budget, True, check_tools(tools))
        return kept, tokens.ids

    def _encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [self.encode_prompt(text) for text in prompts]

    def _collect(
        self, prompt_ids, stop, config: SamplingConfig, stop_ids: Sequence[int] = (), constraint=None
    ) -> list[Completion]:
        completions: list[Completion] = []
        texts = [""] * len(prompt_ids)
        for pieces in self._pieces(prompt_ids, stop, config, completions, stop_ids, constraint):
            texts = [text + piece for text, piece in zip(texts, pieces)]
        return [dataclasses.replace(done, text=text) for done, text in zip(completions, texts)]

    def _pieces(
        self,
        prompt_ids: list[list[int]],
        stop,
        config: SamplingConfig,
        completions: list[Completion],
        stop_ids: Sequence[int] = (),
        constraint: TemplateConstraint | None = None,
    ) -> Iterator[list[str]]:
        """Yield, per step, the new text of every row; fill `completions` (without text) at the end.

        A row ends at <eos>, at any of `stop_ids` (e.g. the chat end marker) or at a stop string.
        A seeded `config` draws every row from one generator, so a batch repeats exactly.
        """
        if not prompt_ids:
            raise UserError("no prompt given")
        end_ids = frozenset({self.tokenizer.eos_id, *stop_ids})
        context = self.model.config.max_position_embeddings
        for ids in prompt_ids:
            if len(ids) >= context:
                raise UserError(f"the prompt has {len(ids)} tokens; this model's context holds {context}")
            if constraint is not None:
                check_room(constraint, min(config.max_new_tokens, context - len(ids)), "the constrained form")
        engine = Engine(self.model, self.tokenizer.pad_id, self.compiled)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=engine.device).manual_seed(config.seed % 2**64)
        requests = [
            Request(ids, config, end_ids, generator, constraint.start() if constraint else None) for ids in prompt_ids
        ]
        streams = {id(request): TextStream(self.tokenizer, stop, end_ids) for request in requests}
        engine.add(requests)
        while engine.has_work():
            pieces = dict.fromkeys(streams, "")
            for token in engine.step():
                stream = streams[id(token.request)]
                pieces[id(token.request)] += stream.feed(token)
                if stream.finished and token.finish_reason is None:  # a stop string
                    engine.remove([token.request])
            yield list(pieces.values())
        completions.extend(
            Completion("", stream.finish_reason, len(ids), stream.token_count)
            for ids, stream in zip(prompt_ids, streams.values())
        )


def load(run_dir: str | Path, device: str | None = None, compiled: bool = False, verify_checksums: bool = True) -> LM:
    """Load a run folder (config, weights, tokenizer, generation settings).

    `compiled`: decode with compiled steps (see `LM`). `verify_checksums`: check the weights' SHA-256
    against the run folder's checksums.json (False, or LMFORGE_SKIP_CHECKSUMS=1, skips hashing a huge
    folder); weights holding NaN or infinity are refused either way.

    A LoRA folder without merged weights (adapter config + adapter weights) loads its base model,
    named in the adapter config, and merges the adapters into it.
    """
    folder = RunFolder(run_dir)
    if not folder.has_weights() and folder.has_adapter():
        base = read_json(folder.adapter_config).get("base_model_name_or_path")
        if not base or not RunFolder(base).has_model():
            raise UserError(f"{folder} holds LoRA adapters for {base!r}, which is not a model folder here")
        model = load_model(base, pick_device(device), verify_checksums)
        load_adapter(folder.path, model, verify_checksums)
        merge_lora(model)
        tokenizer_dir = folder.path if folder.has_tokenizer() else Path(base)
        return LM(model.eval(), Tokenizer.load(tokenizer_dir), read_generation_config(tokenizer_dir), compiled)
    if not folder.has_model():
        raise UserError(f"{folder} is not a model folder: it has no {RunFolder.CONFIG}")
    model = load_model(folder.path, pick_device(device), verify_checksums)
    labels = folder.read_task(default={}).get("labels")
    return LM(model, Tokenizer.load(folder.path), read_generation_config(folder.path), compiled, labels)

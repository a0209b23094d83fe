"""Text <-> token ids: a byte-level BPE tokenizer built on Hugging Face `tokenizers`.

This is the only module that imports `tokenizers`. It trains, saves and loads a
byte-level BPE (the GPT-2 / Qwen2 recipe: a Qwen2 split regex, then bytes mapped
to printable characters), encodes and decodes, pads batches, gives the exact
UTF-8 bytes behind every id (for bits-per-byte and streaming), and detokenizes a
stream of ids without ever emitting half a UTF-8 character.

Any Unicode string round-trips exactly: there is no normalizer (NFC/NFKC would
rewrite the text) and decoding never cleans up spaces. The saved folder is one
`transformers.AutoTokenizer` loads as-is.

It deliberately does not know about models or datasets: it maps text to ids and
back. It carries a chat template (a Jinja string saved in `tokenizer_config.json`)
but does not render it; `data/chat.py` decides where the special tokens go in a
conversation.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from lmforge.errors import UserError
from lmforge.run_folder import RunFolder, atomic_write_text, read_json, write_json

# ids 0..6 in this order; <mask> is for masked-LM pretraining of encoders.
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "<mask>"]
# Fill-in-the-middle markers in StarCoder's names, after SPECIAL_TOKENS in tokenizers trained for code.
FIM_TOKENS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
# Span-corruption sentinels in T5's names (https://arxiv.org/abs/1910.10683 sec. 3.1.4): each dropped span of an
# encoder-decoder's input is replaced by the next one. 32 cover rows of up to ~640 tokens at T5's 15% noise in
# spans of mean length 3. `Tokenizer.with_sentinels` appends them after a tokenizer's last id, so every existing
# id (and every shard of a prepared folder) keeps its meaning.
SENTINEL_TOKENS = [f"<extra_id_{index}>" for index in range(32)]
# ChatML (https://github.com/openai/openai-python/blob/v0.28.1/chatml.md), as Qwen uses it, after our <bos>:
# every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; a reply starts with "<|im_start|>assistant\n".
# Tools follow Hermes / Qwen2.5 (https://qwen.readthedocs.io/en/latest/framework/function_call.html): their
# signatures inside <tools></tools> in the system turn (NOTE: one line each, `name(parameters)：description`,
# not the whole JSON Schema, and no instructions: with the demo tokenizer every ASCII character is a token, and
# a 256-token context must hold the tools, a question, a call, its result and the answer),
# each call as <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> in the assistant's turn, each
# result in a turn of its own with the role "tool". A reasoning trace (`reasoning_content`, as DeepSeek and vLLM
# name it) opens the reply as <think>\n...\n</think>\n. A conversation with none of these renders exactly as
# plain ChatML (PLAIN_CHATML_TEMPLATE), so older run folders read the same.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '<tools>' }}"
    "{% for tool in tools %}"
    "{% set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{ '\\n' + function['name'] + '(' }}"
    "{{ ((function['parameters'] or {})['properties'] or {}) | list | join(', ') }}"
    "{{ ')' }}{% if function['description'] %}{{ '：' + function['description'] }}{% endif %}"
    "{% endfor %}"
    "{{ '\\n</tools><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['reasoning_content'] %}"
    "{{ '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n' }}"
    "{% endif %}"
    "{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{{ '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' }}"
    "{% if function['arguments'] is string %}{{ function['arguments'] }}"
    "{% else %}{{ function['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The template run folders were saved with before tools; `data/chat.py` reads it as CHATML_TEMPLATE.
PLAIN_CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same roles in tokenizers we import, first name found wins: BERT's WordPiece folders say [CLS] for <bos> and
# [SEP] for <eos>; Llama 2 and Mistral say <s>, </s> and end a chat turn with </s>; Llama 3 says <|begin_of_text|>,
# <|end_of_text|> and ends a turn with <|eot_id|>. Qwen2 has one <|endoftext|> and no bos, pad or unk token; like
# transformers, we pad with it, and it stands for bos and unk too. A Llama tokenizer without a pad token pads with
# <unk> (its padding is masked out, so any id would do).
ROLE_TOKENS = {
    "pad": ("<pad>", "[PAD]", "<|endoftext|>", "<|end_of_text|>", "<unk>"),
    "bos": ("<bos>", "[CLS]", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("<eos>", "[SEP]", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "unk": ("<unk>", "[UNK]", "<|endoftext|>", "<|end_of_text|>"),
    "im_start": ("<|im_start|>",),
    "im_end": ("<|im_end|>", "<|eot_id|>", "</s>"),
    "mask": ("<mask>", "[MASK]"),
    "fim_prefix": ("<fim_prefix>",),
    "fim_suffix": ("<fim_suffix>",),
    "fim_middle": ("<fim_middle>",),
}
REQUIRED_ROLES = ("pad", "bos", "eos", "unk")
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The `tokenizer.ggml.pre` name llama.cpp uses for this split pattern.
LLAMA_CPP_PRE_TOKENIZER = "qwen2"

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the specials
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _first_id(backend: Backend, names: Sequence[str]) -> int | None:
    return next((backend.token_to_id(name) for name in names if backend.token_to_id(name) is not None), None)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space,
    soft hyphen...) map to U+0100 onwards, so no BPE token contains whitespace
    or control characters. https://github.com/openai/gpt-2/blob/master/src/encoder.py
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_to_char = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in byte_to_char:
            byte_to_char[byte] = chr(256 + shifted)
            shifted += 1
    return byte_to_char


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    min_frequency: int = 2,
    show_progress: bool = True,
    length: int | None = None,
    han_characters: bool = False,
) -> Backend:
    """A byte-level BPE learnt from `texts` (read once), split by Qwen2's pattern as Qwen2's tokenizer.json is.

    `han_characters` first splits off every Chinese character, so no merge crosses one: each token is at most one
    character of Chinese (runs of Latin letters and digits still merge), and every character boundary of Chinese
    text is a token boundary, which an extractive answer span needs.
    """
    backend = Backend(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated")] if han_characters else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *splits,
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    length = len(texts) if isinstance(texts, Sized) else length
    backend.train_from_iterator(texts, trainer=trainer, length=length)
    return backend


class Tokenizer:
    """A byte-level BPE tokenizer whose first ids are `SPECIAL_TOKENS`, or an imported one (BERT, Qwen2, Llama).

    NOTE: like every Hugging Face tokenizer, `encode` turns the literal text of a
    special token ("<eos>", "<|im_end|>") into that special id rather than into
    ordinary characters, so `transformers` and we agree on every id. Such a
    string therefore does not survive `decode(encode(text))` with the default
    `skip_special_tokens=True`; everything else does. Code that encodes untrusted
    text where a fake special token would matter must remove or escape them first.
    """

    def __init__(self, backend: Backend) -> None:
        # NOTE: an imported tokenizer.json may pad and truncate every text (all-MiniLM-L6-v2's pads to 128);
        # here `pad` pads and the callers truncate, so encode must return exactly the text's ids.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        ids = {role: _first_id(backend, names) for role, names in ROLE_TOKENS.items()}
        missing = [ROLE_TOKENS[role][0] for role in REQUIRED_ROLES if ids[role] is None]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; train one with lmforge")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (ids[role] for role in REQUIRED_ROLES)
        # None where the tokenizer has no such token (an imported BERT one has no chat markers).
        self.im_start_id: int | None = ids["im_start"]
        self.im_end_id: int | None = ids["im_end"]
        self.mask_id: int | None = ids["mask"]
        fim = (ids["fim_prefix"], ids["fim_suffix"], ids["fim_middle"])
        # (prefix, suffix, middle) ids of a tokenizer trained for fill-in-the-middle, else None.
        self.fim_ids: tuple[int, int, int] | None = fim if None not in fim else None
        sentinels = [backend.token_to_id(name) for name in SENTINEL_TOKENS]
        # The ids of SENTINEL_TOKENS in order where the tokenizer has them all, else None.
        self.sentinel_ids: list[int] | None = sentinels if None not in sentinels else None
        # Jinja source saved beside the vocabulary (None: `data/chat.py` falls back to ChatML).
        self.chat_template: str | None = None
        self._token_bytes: list[bytes] | None = None
        self._fingerprint: str | None = None
        self._control_tokens: re.Pattern | None = None
        self._longest_token: int | None = None

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = True,
        fill_in_the_middle: bool = False,
        han_characters: bool = False,
    ) -> Tokenizer:
        """Learn merges from `texts` (any iterable of strings, read once) up to `vocab_size` ids.

        `fill_in_the_middle` adds the `FIM_TOKENS` after the usual special tokens (code models);
        `han_characters` keeps every Chinese character a token boundary (see `train_byte_level_bpe`).
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(
                f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
                f"tokens), got {vocab_size}"
            )
        characters = [0]  # non-blank characters seen; a list so the generator below can count into it

        def counted(texts: Iterable[str]) -> Iterator[str]:
            for text in texts:
                if text.strip():
                    characters[0] += len(text)
                yield text

        length = len(texts) if isinstance(texts, Sized) else None  # a progress total, where known
        # No unk_token: the 256-byte alphabet covers every input. `<unk>` stays as a special for
        # compatibility with tools that expect one.
        specials = SPECIAL_TOKENS + (FIM_TOKENS if fill_in_the_middle else [])
        backend = train_byte_level_bpe(
            counted(texts), vocab_size, specials, min_frequency, show_progress, length, han_characters
        )
        if characters[0] == 0:
            raise UserError(
                "no text to train a tokenizer on: the training data is empty or blank (check the file and the "
                "field read from it; a small corpus may also have put every record in valid/test)"
            )
        tokenizer = cls(backend)
        tokenizer.chat_template = CHATML_TEMPLATE
        if tokenizer.vocab_size < 0.9 * vocab_size:
            warnings.warn(
                f"the tokenizer has {tokenizer.vocab_size} tokens, far fewer than the {vocab_size} asked: "
                f"{characters[0]:,} characters of training text hold no more pairs seen {min_frequency}+ times; "
                "train on more text or ask for a smaller vocabulary",
                stacklevel=2,
            )
        return tokenizer

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = RunFolder(directory).tokenizer
        if not path.is_file():
            raise UserError(f"missing tokenizer file: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise UserError(f"cannot read {path}: {error}") from None
        tokenizer = cls(backend)
        config_path = RunFolder(directory).tokenizer_config
        if config_path.is_file():
            template = read_json(config_path).get("chat_template")
            tokenizer.chat_template = template if isinstance(template, str) else None
        return tokenizer

    def with_sentinels(self) -> Tokenizer:
        """This tokenizer with `SENTINEL_TOKENS` as special tokens after its last id (itself if it has them)."""
        if self.sentinel_ids is not None:
            return self
        backend = Backend.from_str(self.to_str())
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SENTINEL_TOKENS])
        return Tokenizer.from_str(backend.to_str(), self.chat_template)

    def to_str(self) -> str:
        """The whole tokenizer as `tokenizer.json` text (the chat template travels separately)."""
        return self.backend.to_str()

    @classmethod
    def from_str(cls, text: str, chat_template: str | None = None) -> Tokenizer:
        tokenizer = cls(Backend.from_str(text))
        tokenizer.chat_template = chat_template
        return tokenizer

    def save(
        self, directory: str | Path, model_max_length: int | None = None, chat_template: str | None = None
    ) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`, a folder `AutoTokenizer` can load.

        `chat_template` (Jinja) is stored for `apply_chat_template`; default: the tokenizer's own, if any.

        `model_max_length` is the model's context length; the tokenizer does not
        know it, so it is written only when the caller passes it.
        """
        folder = RunFolder(directory)
        atomic_write_text(folder.tokenizer, self.backend.to_str())
        # The tokens' own names: an imported tokenizer calls its roles <s>, [CLS], <|endoftext|>...
        token = self.backend.id_to_token
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.bos_id),
            "eos_token": token(self.eos_id),
            "pad_token": token(self.pad_id),
            "unk_token": token(self.unk_id),
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }
        if self.mask_id is not None:
            config["mask_token"] = token(self.mask_id)
        markers = [token(i) for i in (self.im_start_id, self.im_end_id) if i is not None and i != self.eos_id]
        markers += [token(i) for i in [*(self.fim_ids or ()), *(self.sentinel_ids or ())]]
        if markers:
            config["additional_special_tokens"] = markers
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        if chat_template or self.chat_template:
            config["chat_template"] = chat_template or self.chat_template
        write_json(folder.tokenizer_config, config)

    @property
    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer, for cache keys: equal ids for equal fingerprints."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    @property
    def control_token_pattern(self) -> re.Pattern:
        """A regex matching the text of any special token (lmforge's markers, or an imported folder's own).

        `encode` turns such text into the special id itself, so text from users is checked with it.
        """
        if self._control_tokens is None:
            added = self.backend.get_added_tokens_decoder().values()
            texts = sorted({token.content for token in added if token.special}, key=len, reverse=True)
            self._control_tokens = re.compile("|".join(map(re.escape, texts)) or r"(?!)")  # (?!) never matches
        return self._control_tokens

    @property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for (a special token: its text), so `encode` gives at least
        len(text in bytes) / this many ids."""
        if self._longest_token is None:
            added = self.backend.get_added_tokens_decoder().values()
            self._longest_token = max([*map(len, self.token_bytes()), *(len(t.content.encode()) for t in added)])
        return self._longest_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encode many texts on all cores (the backend's Rust thread pool)."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(encoding.ids, add_bos, add_eos) for encoding in encodings]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`, for mapping answer spans onto tokens."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # int() accepts tensors and numpy arrays as well as lists.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The exact UTF-8 bytes each id stands for; special tokens stand for b"".

        A token may hold part of a character (an emoji split over several ids), so
        these are bytes, not strings. Joining them for `encode(text)` gives
        `text.encode("utf-8")` (for text without special-token strings).
        """
        if self._token_bytes is None:
            char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
            sentencepiece = getattr(self.backend.model, "byte_fallback", False)
            added = self.backend.get_added_tokens_decoder()
            table = [b""] * self.vocab_size
            for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
                if token_id in added:
                    # Added tokens are stored as raw text, not byte-level characters.
                    table[token_id] = b"" if added[token_id].special else token.encode("utf-8")
                elif sentencepiece:
                    # An imported SentencePiece-style BPE (Llama 2, Mistral): text with "▁" for a space,
                    # and <0xNN> pieces for the bytes of characters outside the vocabulary.
                    byte = BYTE_PIECE.fullmatch(token)
                    table[token_id] = bytes([int(byte[1], 16)]) if byte else token.replace("▁", " ").encode("utf-8")
                else:
                    table[token_id] = bytes(char_to_byte[char] for char in token)
            self._token_bytes = table
        return list(self._token_bytes)

    def pad(
        self, sequences: Sequence[Sequence[int]], side: Literal["left", "right"] = "left"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack sequences into (input_ids, attention_mask), both long (B, T); mask 1 marks real tokens.

        Left padding is the default because generation appends on the right.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        length = max((len(sequence) for sequence in sequences), default=0)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, T)
        for row, sequence in enumerate(sequences):
            if not len(sequence):
                continue
            columns = slice(length - len(sequence), length) if side == "left" else slice(0, len(sequence))
            input_ids[row, columns] = torch.as_tensor(sequence, dtype=torch.long)
            attention_mask[row, columns] = 1
        return input_ids, attention_mask


class StreamDecoder:
    """Incremental detokenizer: never emits half a UTF-8 character.

    Bytes of a character split over several tokens are held back until the
    character is complete. It works per code point: a flag or an emoji joined
    with U+200D may arrive over several pushes, each piece valid text.
    Special tokens produce no text, as in `decode(..., skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.token_bytes = tokenizer.token_bytes()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be "")."""
        return self.decoder.decode(self.token_bytes[token_id])

    def flush(self) -> str:
        """End the stream: bytes of an unfinished character come out as U+FFFD."""
        text = self.decoder.decode(b"", final=True)
        self.decoder.reset()
        return text


# Han ideographs (basic block, extension A, compatibility, extensions B-G in the supplementary planes).
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
# CJK Symbols and Punctuation (、。「」《》...) and Halfwidth/Fullwidth Forms (，！？：；（）...).
# Curly quotes, dashes and ellipses are shared with English text, so they belong to neither group.
CJK_PUNCTUATION = "\u3000-\u303f\uff00-\uffef"
ZH_RUN = re.compile(f"[{HAN}{CJK_PUNCTUATION}]+")
HAN_CHARACTER = re.compile(f"[{HAN}]")
# Printable ASCII (letters, digits, punctuation, space) not starting or ending with a space.
EN_RUN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
ALPHANUMERIC = re.compile(r"[A-Za-z0-9]")


def tokenizer_stats(tokenizer: Tokenizer, texts: Iterable[str]) -> dict[str, dict[str, float]]:
    """How compactly the tokenizer encodes Chinese and English, measured separately.

    "zh" is the runs of Han characters and CJK punctuation that contain at least
    one Han character; "en" is the runs of printable ASCII that contain a letter
    or digit, trimmed of spaces. Each run is encoded on its own, so the numbers
    do not depend on how the two languages mix. A group with no text is omitted.
    """
    groups: dict[str, list[str]] = {"zh": [], "en": []}
    for text in texts:
        groups["zh"] += [run for run in ZH_RUN.findall(text) if HAN_CHARACTER.search(run)]
        groups["en"] += [run for run in EN_RUN.findall(text) if ALPHANUMERIC.search(run)]
    stats = {}
    for name, runs in groups.items():
        if not runs:
            continue
        characters = sum(len(run) for run in runs)
        num_bytes = sum(len(run.encode("utf-8")) for run in runs)
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(runs))
        stats[name] = {
            "characters": characters,
            "bytes": num_bytes,
            "tokens": tokens,
            "chars_per_token": characters / tokens,
            "bytes_per_token": num_bytes / tokens,
        }
    return stats

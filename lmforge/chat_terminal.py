"""`lmforge chat`: a multi-turn conversation with a chat model in the terminal, streamed as it is generated.

Commands: /reset (forget the conversation, keep the system prompt), /system TEXT
(set the system prompt), /save FILE (the conversation as {"messages": [...]}
JSON, the format chat fine-tuning reads), /help, /exit (or Ctrl-D). The history
is kept within the model's context: when it no longer fits, the oldest turns go
first and the system prompt stays. After each answer the speed is shown.

This module knows the terminal loop; generation and templates are `LM.chat`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.data.chat import Message
from lmforge.errors import UserError
from lmforge.lm import LM

HELP = "commands: /reset  /system TEXT  /save FILE  /help  /exit"


class ChatSession:
    """The conversation so far and what each command does to it."""

    def __init__(self, lm: LM, system: str | None = None, **sampling) -> None:
        self.lm = lm
        self.system = system
        self.history: list[Message] = []
        self.sampling = sampling

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reply(self, text: str, write: Callable[[str], None]) -> tuple[int, float, bool]:
        """Answer `text`, writing the reply as it comes; (tokens, seconds, whether old turns were dropped)."""
        config = self.lm.sampling(**self.sampling)
        asked = [*self.messages(), {"role": "user", "content": text}]
        kept, _ = self.lm.fit_chat(asked, config.max_new_tokens)
        dropped = len(kept) < len(asked)
        started = time.perf_counter()
        pieces = []
        for piece in self.lm.chat(kept, stream=True, **self.sampling):
            pieces.append(piece)
            write(piece)
        seconds = time.perf_counter() - started
        answer = "".join(pieces)
        self.history = [m for m in kept if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
        # The end marker is a token too, but produces no text.
        return len(self.lm.tokenizer.encode(answer)) + 1, seconds, dropped

    def save(self, path: str) -> Path:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"messages": self.messages()}, ensure_ascii=False, indent=2) + "\n", "utf-8")
        return target


def run_chat(lm: LM, system: str | None = None, read: Callable[[str], str] = input, **sampling) -> None:
    """The read-reply loop until /exit or end of input."""
    session = ChatSession(lm, system, **sampling)

    def write(text: str) -> None:
        print(text, end="", flush=True)

    print(f"lmforge chat — {HELP}")
    while True:
        try:
            line = read("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/exit":
            return
        if command == "/help":
            print(HELP)
        elif command == "/reset":
            session.history = []
            print("(conversation cleared)")
        elif command == "/system":
            session.system = argument.strip() or None
            print(f"(system prompt: {session.system or 'none'})")
        elif command == "/save":
            if not argument.strip():
                print("usage: /save FILE")
                continue
            print(f"(saved to {session.save(argument.strip())})")
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}")
        else:
            try:
                tokens, seconds, dropped = session.reply(line, write)
            except UserError as error:
                print(f"error: {error}")
                continue
            note = "; oldest turns dropped to fit the context" if dropped else ""
            print(f"\n({tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s{note})")

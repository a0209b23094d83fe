"""`lmforge chat`: a multi-turn conversation with a chat model in the terminal, streamed as it is generated.

Commands: /reset (forget the conversation, keep the system prompt), /system TEXT
(set the system prompt), /save FILE (the conversation as {"messages": [...]}
JSON, the format chat fine-tuning reads), /help, /exit (or Ctrl-D). The history
is kept within the model's context: when it no longer fits, the oldest turns go
first and the system prompt stays. After each answer the speed is shown.

With a `Toolbox` (`lmforge chat --tools calculator,date`) the model is shown the tools' signatures; when
its reply is a tool call, the call runs here, its result (or its error, one line) goes back to the model
as a tool message, and the model goes on, up to MAX_TOOL_ROUNDS calls per question.

This module knows the terminal loop; generation and templates are `LM.chat`'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.data.chat import Message, parse_reply
from lmforge.data.tools import Toolbox
from lmforge.errors import UserError
from lmforge.lm import LM

HELP = "commands: /reset  /system TEXT  /save FILE  /help  /exit"
MAX_TOOL_ROUNDS = 4


class ChatSession:
    """The conversation so far and what each command does to it."""

    def __init__(self, lm: LM, system: str | None = None, toolbox: Toolbox | None = None, **sampling) -> None:
        self.lm = lm
        self.system = system
        self.toolbox = toolbox
        self.history: list[Message] = []
        self.sampling = sampling

    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reply(self, text: str, write: Callable[[str], None]) -> tuple[int, float, bool]:
        """Answer `text` (calling tools on the way), writing the reply as it comes; (tokens, seconds, whether old
        turns were dropped)."""
        config = self.lm.sampling(**self.sampling)
        tools = self.toolbox.signatures if self.toolbox else None
        asked = [*self.messages(), {"role": "user", "content": text}]
        kept, _ = self.lm.fit_chat(asked, config.max_new_tokens, tools)
        dropped = len(kept) < len(asked)
        started, tokens = time.perf_counter(), 0
        for number in range(MAX_TOOL_ROUNDS + 1):
            pieces = []
            for piece in self.lm.chat(kept, stream=True, tools=tools, **self.sampling):
                pieces.append(piece)
                write(piece)
            answer = "".join(pieces)
            tokens += len(self.lm.tokenizer.encode(answer)) + 1  # the end marker is a token too, but shows no text
            calls = parse_reply(answer, known=self.toolbox.names).tool_calls if self.toolbox else []
            if not calls or number == MAX_TOOL_ROUNDS:
                break
            kept = [*kept, *self._run(calls, number, write)]
        self.history = [m for m in kept if m["role"] != "system"] + [{"role": "assistant", "content": answer}]
        return tokens, time.perf_counter() - started, dropped

    def _run(self, calls: list[dict], number: int, write: Callable[[str], None]) -> list[Message]:
        """The assistant's call message and one tool message per call, each call run and shown."""
        messages = self.toolbox.answer(calls, f"call_{number}")
        for call, result in zip(calls, messages[1:]):
            write(f"\n[{call['name']} {json.dumps(call['arguments'], ensure_ascii=False)} -> {result['content']}]\n")
        return messages

    def save(self, path: str) -> Path:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"messages": self.messages()}, ensure_ascii=False, indent=2) + "\n", "utf-8")
        return target


def run_chat(
    lm: LM,
    system: str | None = None,
    read: Callable[[str], str] = input,
    toolbox: Toolbox | None = None,
    **sampling,
) -> None:
    """The read-reply loop until /exit or end of input."""
    session = ChatSession(lm, system, toolbox, **sampling)

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

"""`lmforge chat` driven through a real pseudo-terminal: streaming, /system, /save, /reset, /exit."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from lmforge.data.tokenizer import Tokenizer
from lmforge.generate.sampling import SamplingConfig
from lmforge.lm import save_generation_config
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    tokenizer = Tokenizer.train(["你好，今天天气很好。", "hello world"] * 20, vocab_size=300, show_progress=False)
    tokenizer.save(folder)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
        max_position_embeddings=128,
    )  # fmt: skip
    save_model(folder, Decoder(config))
    save_generation_config(folder, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=0), tokenizer)
    return folder


class Terminal:
    """A child process on a pseudo-terminal, read until expected text appears."""

    def __init__(self, command: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.output = ""

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                self.output = self.output[match.end() :]
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s; got {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the program ended before {pattern!r}; got {self.output!r}")
                self.output += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode("utf-8"))


def test_terminal_chat_streams_answers_and_obeys_its_commands(chat_model, tmp_path):
    terminal = Terminal([sys.executable, "-m", "lmforge", "chat", "--model", str(chat_model), "--device", "cpu"])
    try:
        terminal.expect(r"/reset\s+/system TEXT\s+/save FILE")
        terminal.expect(r"> ")
        terminal.send("/system 你是一个助手。")
        terminal.expect(r"\(system prompt: 你是一个助手。\)")
        terminal.send("你好")
        speed = terminal.expect(r"\((\d+) tokens, ([\d.]+) tokens/s\)")
        assert int(speed.group(1)) >= 1 and float(speed.group(2)) > 0
        saved = tmp_path / "conversation.json"
        terminal.send(f"/save {saved}")
        terminal.expect(r"\(saved to ")
        messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert messages[0]["content"] == "你是一个助手。" and messages[1]["content"] == "你好"
        terminal.send("/reset")
        terminal.expect(r"\(conversation cleared\)")
        terminal.send(f"/save {saved}")
        terminal.expect(r"\(saved to ")
        assert json.loads(saved.read_text(encoding="utf-8"))["messages"] == [messages[0]]
        terminal.send("/exit")
        assert terminal.process.wait(timeout=30) == 0
    finally:
        terminal.process.kill()
        os.close(terminal.master)


class _ScriptedLM:
    """Stands in for LM: each reply is the next of `replies`; it records the conversations it was asked."""

    def __init__(self, replies, tokenizer):
        self.replies, self.asked, self.tokenizer = list(replies), [], tokenizer

    def sampling(self, **overrides):
        return SamplingConfig(max_new_tokens=16)

    def fit_chat(self, messages, max_new_tokens, tools=None):
        return list(messages), []

    def chat(self, messages, stream=False, tools=None, **sampling):
        self.asked.append((list(messages), tools))
        return iter([self.replies.pop(0)])


def test_tool_calls_run_and_their_results_go_back_to_the_model(chat_model):
    from lmforge.chat_terminal import ChatSession
    from lmforge.data.sources import builtin_toolbox

    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'
    lm = _ScriptedLM([call % "3*(4+5)", call % "__import__('os')", "是27。"], Tokenizer.load(chat_model))
    session = ChatSession(lm, toolbox=builtin_toolbox(["calculator", "date"]))
    shown = []
    session.reply("3乘以4加5的和是多少？", shown.append)
    assert [tool["function"]["name"] for tool in lm.asked[0][1]] == ["calculator", "date"]
    results = [m["content"] for m in lm.asked[2][0] if m["role"] == "tool"]
    assert results[0] == "27" and results[1].startswith("error: only numbers")  # ast, never eval
    assert '[calculator {"expression": "3*(4+5)"} -> 27]' in "".join(shown)
    assert session.history[0]["content"] == "3乘以4加5的和是多少？" and session.history[-1] == {
        "role": "assistant", "content": "是27。"}  # fmt: skip


def test_unknown_tools_are_a_one_line_error(chat_model):
    command = [sys.executable, "-m", "lmforge", "chat", "--model", str(chat_model), "--tools", "calculator,shell"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "unknown tools ['shell']" in done.stderr and "Traceback" not in done.stderr

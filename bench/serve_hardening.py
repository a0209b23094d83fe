"""Does `lmforge serve` keep answering /health while it is attacked? A 50 MB body, a looping template, idle connections.

    python bench/serve_hardening.py [--connections 20000] [--idle-seconds 12]

Two real `lmforge serve` processes on 127.0.0.1 with their default limits (a tiny random model with a
256-token context; one of them has a chat template that loops forever). While each attack runs, a
prober in this process asks GET /health on a new connection every 0.1 s; the table gives the slowest
and the median answer per attack (goal: every one within 1 s), what the attack itself got back, and
for the idle connections how many files the server held at most and how many log lines it wrote.
The attacks: a 50 MB body announced with Content-Length and one sent chunked (both: 413); a 3.9 MB
prompt within the body limit (tokenized in a worker thread: 400, longer than the context); 8 chat
requests at once against the looping template (400 from the render budget); `--connections` TCP
connections that never send a byte, held open past the 10 s head deadline (this process raises its
soft limit on open files as far as the hard limit allows, and says how many it opened).
"""

import argparse
import contextlib
import os
import resource
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from _common import print_table
from serve import server_process

from lmforge.data.sources import read_split, record_text
from lmforge.data.tokenizer import Tokenizer
from lmforge.models import save_model
from lmforge.models.decoder import Decoder, DecoderConfig

LOOPING = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
FIFTY_MB = 50 * 2**20


def tiny_model(folder: Path, chat_template: str | None = None) -> Path:
    """A run folder: a 2-layer random decoder with a 256-token context, a tokenizer trained on some built-in news."""
    texts = [record_text(record) for _, record in zip(range(300), read_split("builtin:peoples-daily", "train"))]
    tokenizer = Tokenizer.train(texts, vocab_size=1000, show_progress=False)
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                           intermediate_size=128, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    save_model(folder, Decoder(config))
    tokenizer.save(folder, chat_template=chat_template)
    return folder


class Prober:
    """GET /health on a new connection every `every` seconds in a thread, keeping each answer's latency."""

    def __init__(self, url: str, every: float = 0.1) -> None:
        self.url, self.every = url, every
        self.seconds: list[float] = []
        self.failures = 0
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while self.running:
            started = time.monotonic()
            try:  # a raw request: an HTTP client's own setup would be timed too
                with socket.create_connection((host, int(port)), timeout=30) as connection:
                    connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    ok = connection.recv(100).startswith(b"HTTP/1.1 200 ")
            except OSError:
                ok = False
            self.seconds.append(time.monotonic() - started)
            self.failures += not ok
            time.sleep(max(0.0, self.every - (time.monotonic() - started)))

    def __enter__(self) -> "Prober":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()

    def row(self, attack: str, outcome: str) -> list:
        return [attack, len(self.seconds), self.failures, sum(seconds > 1.0 for seconds in self.seconds),
                f"{max(self.seconds):.3f}", f"{statistics.median(self.seconds):.3f}", outcome]  # fmt: skip


def raw_post(url: str, head: bytes, body_chunks, path: str = "/v1/completions") -> str:
    """Send a POST by hand (head, then body chunks until the server answers or hangs up); its status line."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as connection:
        connection.sendall(b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n%s\r\n"
                           % (path.encode(), head))  # fmt: skip
        with contextlib.suppress(OSError):  # the server may answer and close before the body is through
            for chunk in body_chunks:
                connection.sendall(chunk)
        return connection.recv(4096).split(b"\r\n")[0].decode()


def timed(attack: Callable[[], str]) -> str:
    started = time.monotonic()
    outcome = attack()
    return f"{outcome} in {time.monotonic() - started:.2f} s"


def body_attacks(url: str) -> list[list]:
    rows = []
    with Prober(url) as prober:
        time.sleep(1)
    rows.append(prober.row("none (baseline)", ""))
    megabyte = b"x" * 2**20
    with Prober(url) as prober:
        declared = b"Content-Length: %d\r\n" % FIFTY_MB
        outcome = timed(lambda: raw_post(url, declared, (megabyte for _ in range(50))))
    rows.append(prober.row("50 MB body, Content-Length", outcome))
    with Prober(url) as prober:
        chunks = (b"%x\r\n%s\r\n" % (len(megabyte), megabyte) for _ in range(50))
        outcome = timed(lambda: raw_post(url, b"Transfer-Encoding: chunked\r\n", chunks))
    rows.append(prober.row("50 MB body, chunked", outcome))
    for megabytes in (0.002, 3.9):  # one that must be tokenized to be judged, one too long to fit at all
        prompt = "北京是中国的首都，" * (int(megabytes * 2**20) // len("北京是中国的首都，".encode()))
        with Prober(url) as prober:
            body = {"model": "bench", "prompt": prompt}
            outcome = timed(lambda body=body: httpx.post(url + "/v1/completions", json=body, timeout=120).reason_phrase)
        rows.append(prober.row(f"{megabytes:g} MB prompt", outcome))
    return rows


def template_attack(url: str, requests: int = 8) -> list:
    body = {"model": "bench", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}
    statuses: list[int] = []

    def ask() -> None:
        statuses.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=120).status_code)

    with Prober(url) as prober:
        started = time.monotonic()
        askers = [threading.Thread(target=ask) for _ in range(requests)]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        outcome = f"{requests} x {sorted(set(statuses))} in {time.monotonic() - started:.2f} s"
    return prober.row(f"looping template x {requests}", outcome)


def server_pid() -> int:
    """The `lmforge serve` child of this process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    return int(entry)
    raise RuntimeError("no lmforge serve child process")


def idle_attack(url: str, wanted: int, hold: float, log: Path) -> list:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client's own ends need a file each
    wanted = min(wanted, hard - 100)
    host, port = url.removeprefix("http://").split(":")
    pid = server_pid()
    server_files = [len(os.listdir(f"/proc/{pid}/fd"))]
    lines_before = log.read_text().count("closed connections")
    idle, failed = [], 0
    with Prober(url) as prober:
        started = time.monotonic()
        for _ in range(wanted):
            try:
                idle.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                failed += 1
            if len(idle) % 500 == 0:
                server_files.append(len(os.listdir(f"/proc/{pid}/fd")))
        opened = time.monotonic() - started
        while time.monotonic() - started < hold:
            server_files.append(len(os.listdir(f"/proc/{pid}/fd")))
            time.sleep(0.2)
        settled = server_files[-1]
    for connection in idle:
        connection.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lines = log.read_text().count("closed connections") - lines_before
    outcome = (f"{len(idle):,} opened in {opened:.1f} s ({failed} failed); server held <= {max(server_files):,} "
               f"files ({settled:,} after {hold:.0f} s); {lines} log lines about them in {hold:.0f} s")  # fmt: skip
    return prober.row(f"{wanted:,} idle connections", outcome)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--idle-seconds", type=float, default=12.0, help="how long the idle connections are held")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        plain = tiny_model(Path(scratch) / "plain")
        looping = tiny_model(Path(scratch) / "looping", chat_template=LOOPING)
        log = Path(scratch) / "serve.log"
        with log.open("w") as out:
            with server_process(looping, 8776, log=out, start_seconds=600) as url:
                rows = [template_attack(url)]
            with server_process(plain, 8775, log=out, start_seconds=600) as url:
                rows += body_attacks(url)
                rows.append(idle_attack(url, arguments.connections, arguments.idle_seconds, log))
    print(f"CPU: {os.cpu_count()} cores; torch threads: {torch.get_num_threads()}")
    print_table(["attack", "/health probes", "failed", "over 1 s", "slowest s", "median s", "the attack got"], rows)


if __name__ == "__main__":
    main()

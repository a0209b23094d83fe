"""Running generated code to see whether it passes its tests: each program in its own limited subprocess.

Each program runs in a fresh `python -I` (isolated mode: no PYTHONPATH, no user site-packages, the script's folder
not on the import path) in a new session (so a timeout kills the program's whole process group), with an empty
temporary working folder that is deleted afterwards, an environment holding only PATH and a UTF-8 locale,
no stdin, and POSIX resource limits: CPU seconds, address space, the size of any file it writes, no core dumps.

What this does NOT protect against: the program runs as the same user as lmforge, so it can read (and write, within
the file-size limit) any file that user can, open network connections, and start other processes. Run untrusted
models' code inside a container or a throw-away virtual machine. It is a harness for scoring, not a security
boundary. POSIX only (the limits come from the `resource` module).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmforge.errors import UserError


@dataclass(frozen=True)
class Limits:
    seconds: float = 10.0  # wall clock; CPU time is capped a second above it
    memory_mb: int = 1024  # address space
    file_size_mb: int = 16  # largest file the program may write


@dataclass(frozen=True)
class Outcome:
    status: str  # "passed", "failed" or "timeout"
    detail: str = ""  # the last lines of stderr of a failed program

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limit(limits: Limits):
    """The child's resource limits, set between fork and exec."""
    import resource  # POSIX only: imported where it is used, so the module loads everywhere

    def apply() -> None:
        cpu = int(limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_size_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run `program` (Python source) in its own limited subprocess; "passed" when it exits with status 0."""
    if os.name != "posix":
        raise UserError("running generated code needs a POSIX system (Linux, macOS) for its resource limits")
    with tempfile.TemporaryDirectory(prefix="lmforge-exec-") as folder:
        script, work = os.path.join(folder, "program.py"), os.path.join(folder, "work")
        os.mkdir(work)  # the program's working folder starts empty: the script lies beside it
        with open(script, "w", encoding="utf-8") as file:
            file.write(program)
        environment = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        process = subprocess.Popen(
            [sys.executable, "-I", script],
            cwd=work,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_limit(limits),
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return Outcome("timeout", f"killed after {limits.seconds:g} s")
        finally:
            _kill_group(process)  # children it left behind
    if process.returncode == 0:
        return Outcome("passed")
    lines = stderr.decode("utf-8", errors="replace").strip().splitlines()
    return Outcome("failed", " | ".join(lines[-2:]) if lines else f"exit status {process.returncode}")


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, 9)
    process.wait()


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Outcome]:
    """`run_program` over many programs, a few at a time (each waits on its own subprocess)."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda program: run_program(program, limits), programs))

"""Run one fuzz case in a forked child under a memory cap and a timeout, and classify how it ended.

The parent imports qwenlite and compiles every kernel once (it is the "fork server"); each case is a
``fork()`` of it, so a case costs ~40 ms instead of a fresh interpreter and a Numba cache load.
Numba's default OpenMP threading layer cannot survive ``fork()`` (libgomp aborts the child), so the
campaign runs with ``NUMBA_THREADING_LAYER=workqueue`` (``run.py`` sets it before Numba starts).

Outcomes, of which only the first two are acceptable:

* ``ok``: the case ran to its end.
* ``error``: a ``QwenliteError`` whose message is one line of at most ``MAX_MESSAGE`` characters.
* ``message``: a ``QwenliteError`` with a multi-line or unbounded message.
* ``traceback``: any other exception (``MemoryError`` included: the cap was hit).
* ``hang``: still running after the timeout (the child is killed).
* ``crash``: the child died by a signal or exited without reporting.
* ``leftover``: the case ran but left files behind that it must not (temp files of a writer).
"""

from __future__ import annotations

import os
import pickle
import resource
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

MAX_MESSAGE = 600  # characters of an error message, its file path included
BAD = ("message", "traceback", "hang", "crash", "leftover")


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    seconds: float = 0.0


def _address_space() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _child(case: Callable[[], None], wfd: int, mem_bytes: int) -> None:
    from qwenlite.errors import QwenliteError

    limit = _address_space() + mem_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        case()
        result = Outcome("ok")
    except QwenliteError as exc:
        msg = str(exc)
        bad = "\n" in msg or len(msg) > MAX_MESSAGE or not msg
        result = Outcome("message" if bad else "error", f"{type(exc).__name__}: {msg[:300]}")
    except BaseException as exc:  # noqa: BLE001 - everything else is what the campaign looks for
        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))
        result = Outcome("traceback", f"{type(exc).__name__}: {str(exc)[:200]} @ {where}")
    os.write(wfd, pickle.dumps(result))
    os.close(wfd)
    os._exit(0)


def run_case(case: Callable[[], None], timeout: float = 20.0, mem_bytes: int = 1 << 30) -> Outcome:
    """Run ``case()`` in a fork under ``mem_bytes`` of extra address space and ``timeout`` seconds."""
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        try:
            _child(case, wfd, mem_bytes)
        finally:
            os._exit(3)
    os.close(wfd)
    data = b""
    deadline = t0 + timeout
    hung = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if not ready:
            continue
        chunk = os.read(rfd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(rfd)
    if hung:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - t0
    if hung:
        return Outcome("hang", f"> {timeout:.0f} s", seconds)
    if os.WIFSIGNALED(status):
        return Outcome("crash", f"signal {os.WTERMSIG(status)}", seconds)
    try:
        out: Outcome = pickle.loads(data)
    except Exception:  # noqa: BLE001
        return Outcome("crash", f"exit status {os.waitstatus_to_exitcode(status)} without a report", seconds)
    out.seconds = seconds
    return out

"""User reward functions run in a worker process, so that a timeout can stop them.

A thread cannot be stopped: a reward stuck in ``while True: pass`` would keep its thread busy and the
interpreter would hang at exit joining it. Here a user's ``module:function`` runs in a separate Python process
(one per function, started on first use and reused across calls); the parent waits at most ``timeout_s`` for
each answer and on a timeout kills the worker's whole process group, then starts a fresh worker for the
remaining calls.

The worker is this file run as a script: it imports only the standard library and the user's module (never
torch nor posttrain), so it starts in tens of milliseconds. It is started with ``subprocess`` (fork + exec),
never a bare ``fork`` of a parent that holds torch's threads. Calls travel as one pickled batch of
``(completion, kwargs)`` pairs; each answer comes back as one small JSON message, so the parent never
unpickles anything. A worker exits when the parent closes its end, and by itself if the parent dies.

Outcomes, one per call (lists, as JSON gives them back):
``["ok", float]``, ``["type", name]`` (not a number), ``["raised", type, message]``, ``["timeout"]``,
``["died", exit_code]``.

    >>> as_outcome(3), as_outcome(True), as_outcome("high")
    (['ok', 3.0], ['type', 'bool'], ['type', 'str'])
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any

# Importing the user's module in a fresh worker may take a while (numpy, sympy...); not counted in timeout_s.
START_TIMEOUT_S = 60.0
_GRACE_S = 0.5  # after SIGTERM, before SIGKILL


class WorkerError(Exception):
    """The worker could not be started or fed (an import that fails only there, rows that cannot be pickled)."""


def as_outcome(value: Any) -> list[Any]:
    """The outcome of a call that returned ``value``: ``["ok", float]`` for a real number, else ``["type", name]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ["type", type(value).__name__]
    try:
        return ["ok", float(value)]
    except OverflowError:  # an int too large for a float
        return ["ok", math.inf if value > 0 else -math.inf]


def call_outcome(fn: Callable[..., Any], completion: str, kwargs: dict[str, Any]) -> list[Any]:
    """Call ``fn(completion, **kwargs)``; its outcome, an exception included (as ``["raised", type, message]``)."""
    try:
        value = fn(completion, **kwargs)
    except BaseException as err:  # noqa: BLE001 - user code may raise anything, SystemExit included
        try:
            message = str(err)
        except Exception:  # noqa: BLE001
            message = repr(err)
        return ["raised", type(err).__name__, message]
    return as_outcome(value)


def is_failure(outcome: list[Any]) -> bool:
    """True unless the call returned a finite number."""
    return outcome[0] != "ok" or not math.isfinite(outcome[1])


class _Worker:
    """One worker process serving one user function."""

    def __init__(self, module: str, attr: str, expected_file: str | None):
        parent_end, child_end = Pipe(duplex=True)
        flags = ["-P"] if sys.version_info >= (3, 11) else []  # no script directory on sys.path
        fd = child_end.fileno()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, *flags, os.path.abspath(__file__), str(fd), str(os.getpid())],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: a kill also ends what the user function started
            )
        except OSError as err:
            parent_end.close()
            raise WorkerError(f"cannot start {sys.executable} ({err})") from None
        finally:
            child_end.close()
        self.conn = parent_end
        self.lock = threading.Lock()
        try:
            self.conn.send(("load", list(sys.path), module, attr))
        except OSError:
            pass  # it died already: receive() says so
        reply = self.receive(START_TIMEOUT_S)
        if reply[0] == "timeout":
            reply = ["error", f"importing {module!r} there took longer than {START_TIMEOUT_S:.0f}s"]
        elif reply[0] == "died":
            reply = ["error", f"it exited with code {reply[1]} before importing {module!r}"]
        elif reply[0] == "ready" and expected_file and reply[1]:
            if os.path.realpath(reply[1]) != os.path.realpath(expected_file):
                reply = ["error", f"it imported {module!r} from {reply[1]}, not {expected_file}"]
        if reply[0] != "ready":
            self.kill()
            raise WorkerError(reply[1])

    def receive(self, timeout_s: float) -> list[Any]:
        """The next message, ``["timeout"]`` after ``timeout_s``, or ``["died", code]`` if the worker is gone."""
        try:
            if self.conn.poll(timeout_s):
                return json.loads(self.conn.recv_bytes())
            return ["timeout"]
        except (EOFError, OSError):
            self.kill()
            return ["died", self.proc.returncode]

    def kill(self) -> None:
        """SIGTERM the worker's process group, SIGKILL what is left after a grace period, reap the worker.
        Safe to call twice."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:  # the group is gone already
                pass
            try:
                self.proc.wait(_GRACE_S if sig == signal.SIGTERM else None)
            except subprocess.TimeoutExpired:
                pass
        self.conn.close()


_Key = tuple[str, str, str | None]
_WORKERS: dict[_Key, _Worker] = {}
_POOL_LOCK = threading.Lock()
_OWNER = os.getpid()


def _worker(key: _Key) -> _Worker:
    global _OWNER
    with _POOL_LOCK:
        if os.getpid() != _OWNER:  # a forked child: its parent's workers are not ours to use
            _WORKERS.clear()
            _OWNER = os.getpid()
        if key not in _WORKERS:
            _WORKERS[key] = _Worker(*key)
        return _WORKERS[key]


def _discard(key: _Key, worker: _Worker) -> None:
    with _POOL_LOCK:
        if _WORKERS.get(key) is worker:
            del _WORKERS[key]
    worker.kill()


def _run_batch(
    worker: _Worker, items: list[tuple[str, dict[str, Any]]], timeout_s: float, stop_at_failure: bool
) -> list[list[Any]] | None:
    """Outcomes of ``items`` up to the first timeout or death (or failure, with ``stop_at_failure``); None if the
    worker was found dead before it got the batch."""
    try:
        worker.conn.send(items)
    except OSError:
        return None
    except Exception as err:  # noqa: BLE001 - pickling a row may raise anything
        raise WorkerError(f"cannot send the rows to its worker ({type(err).__name__}: {err})") from None
    outcomes = []
    for _ in items:
        outcome = worker.receive(timeout_s)
        outcomes.append(outcome)
        if outcome[0] in ("timeout", "died") or (stop_at_failure and is_failure(outcome)):
            break
    return outcomes


def run_calls(
    module: str,
    attr: str,
    items: list[tuple[str, dict[str, Any]]],
    *,
    timeout_s: float,
    stop_at_failure: bool,
    expected_file: str | None = None,
) -> list[list[Any]]:
    """Outcomes of ``module.attr(completion, **kwargs)`` for each item, computed in the function's worker.

    Each call may take ``timeout_s``: a call that takes longer gets ``["timeout"]``, its worker is killed and the
    remaining calls go to a fresh one. With ``stop_at_failure`` the list ends at the first failed call (and the
    worker, if still busy with the rest of the batch, is killed). Raises ``WorkerError`` if a worker cannot
    start or the rows cannot be sent.
    """
    key: _Key = (module, attr, expected_file)
    outcomes: list[list[Any]] = []
    restarts = 0
    while len(outcomes) < len(items):
        worker = _worker(key)
        with worker.lock:
            batch = _run_batch(worker, items[len(outcomes) :], timeout_s, stop_at_failure)
        if batch is None:  # died while idle (killed from outside, out of memory): one fresh start
            _discard(key, worker)
            restarts += 1
            if restarts > 1:
                raise WorkerError("its worker died before it could take the calls")
            continue
        outcomes += batch
        last = batch[-1]
        if last[0] in ("timeout", "died") or (is_failure(last) and stop_at_failure and len(outcomes) < len(items)):
            _discard(key, worker)
        if stop_at_failure and is_failure(last):
            break
    return outcomes


def shutdown_workers() -> None:
    """Kill every reward worker this process started (also run at exit)."""
    with _POOL_LOCK:
        workers = list(_WORKERS.values()) if os.getpid() == _OWNER else []
        _WORKERS.clear()
    for worker in workers:
        worker.kill()


def worker_pids() -> list[int]:
    """Process ids of the live reward workers (for tests and diagnostics)."""
    with _POOL_LOCK:
        return [w.proc.pid for w in _WORKERS.values()] if os.getpid() == _OWNER else []


atexit.register(shutdown_workers)


# --- the worker side: this file run as a script --------------------------------------------------------------


def _exit_with_parent(parent_pid: int) -> None:
    """A stuck reward must not outlive a parent that died without killing it."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _serve(fd: int, parent_pid: int) -> None:
    conn = Connection(fd)
    _exit_with_parent(parent_pid)

    def reply(message: list[Any]) -> None:
        conn.send_bytes(json.dumps(message).encode())

    _, path, module_name, attr = conn.recv()
    sys.path[:] = path
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except BaseException as err:  # noqa: BLE001 - a user module may raise anything on import
        reply(["error", f"cannot import it there ({type(err).__name__}: {err})"])
        return
    reply(["ready", getattr(module, "__file__", None)])
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # the parent closed its end
            return
        for completion, kwargs in batch:
            reply(call_outcome(fn, completion, kwargs))


if __name__ == "__main__":
    try:
        _serve(int(sys.argv[1]), int(sys.argv[2]))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent went away: nothing to report to
        pass

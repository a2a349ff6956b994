"""Reward functions run in a small pool of worker processes, each call under a hard time limit.

A reward function is named by a spec: `package.module:function` (importable like any module of the
host process) or `path/to/file.py:function`. It is called by keyword with the arguments it declares
among `REWARD_ARGUMENTS`:

    response      the response text (verl's name `solution_str` is accepted too)
    ground_truth  the row's answer
    data_source   the row's `data_source` ("" when the file has none)
    prompt        the prompt text after the template
    extra         the row's other fields, as the data file has them (a dict)
    extra_info    the row's `extra_info` field (verl's signature), None when absent

and returns a number, or a dict with a number under "score" and other numbers (extra metrics). So a
verl `compute_score(data_source, solution_str, ground_truth, extra_info=None)` works unchanged.

Why processes: a check can hang (sympy on a pathological answer, a user's bug), and only a process
can be stopped from outside. A call that outlives `timeout_s` kills its worker, which is restarted on
demand (start-up and imports are outside the deadline). Calls run `workers` at a time, so N slow calls
in one batch cost about one time limit, not N; results keep the input order. Workers stop when the
host process ends, however it ends, and need no `__main__` guard in the host.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

BUILTIN_MATH = "math"  # the spec of the built-in math check (`algo.rewards`), which runs partly in-process
REWARD_ARGUMENTS = ("response", "solution_str", "ground_truth", "data_source", "prompt", "extra", "extra_info")
_STARTUP_TIMEOUT_S = 120.0  # imports (sympy, a user's module): generous, CI machines are shared


def default_workers() -> int:
    """min(4, the CPUs this process may use): enough to overlap a few slow checks, few enough to share."""
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _is_file(target: str) -> bool:
    return target.endswith(".py") or os.sep in target


def absolute(spec: str) -> str:
    """`spec` with a file path made absolute (workers resolve it wherever they run)."""
    target, sep, name = spec.rpartition(":")
    return f"{Path(target).resolve()}:{name}" if sep and _is_file(target) else spec


def load_function(spec: str) -> Callable:
    """The function a spec names (`package.module:function` or `path/to/file.py:function`).

    Raises ValueError saying what is wrong (form, missing file or module, missing or non-callable name).
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"{spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    if _is_file(target):
        path = Path(target).resolve()
        if not path.is_file():
            raise ValueError(f"{spec!r}: file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"s2l_reward_{abs(hash(str(path)))}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception:
            raise ValueError(f"{spec!r}: importing {path} failed:\n{traceback.format_exc()}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"{spec!r}: no module {e.name!r} (is its directory on PYTHONPATH?)") from None
        except Exception:
            raise ValueError(f"{spec!r}: importing {target} failed:\n{traceback.format_exc()}") from None
    function = getattr(module, name, None)
    if not callable(function):
        found = "not found" if function is None else f"a {type(function).__name__}, not a function"
        raise ValueError(f"{spec!r}: {name!r} in {target} is {found}")
    return function


def reward_parameters(function: Callable) -> Optional[tuple[str, ...]]:
    """The `REWARD_ARGUMENTS` `function` takes (None: all of them, it has **kwargs).

    Raises ValueError when it needs an argument that is not one of them, takes arguments only by
    position, or does not take the response.
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        raise ValueError("its signature cannot be read (a builtin?): wrap it in a Python function") from None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        return None
    required = [p for p in parameters if p.default is p.empty and p.kind != p.VAR_POSITIONAL]
    unknown = [p.name for p in required if p.name not in REWARD_ARGUMENTS or p.kind == p.POSITIONAL_ONLY]
    if unknown:
        raise ValueError(f"it requires {unknown}, which the scorer does not pass; arguments are passed by keyword "
                         f"and may be any of {list(REWARD_ARGUMENTS)}")
    names = tuple(p.name for p in parameters if p.name in REWARD_ARGUMENTS and p.kind != p.POSITIONAL_ONLY)
    if not {"response", "solution_str"} & set(names):
        raise ValueError("it does not take the response: name an argument 'response' (or 'solution_str')")
    return names


def check_function(spec: str) -> None:
    """Load `spec` and check its signature, as the workers will; ValueError says what is wrong."""
    function = load_function(spec)
    try:
        reward_parameters(function)
    except ValueError as e:
        raise ValueError(f"{spec!r}: {e}") from None


class Outcome(NamedTuple):
    """One call's result: the returned value, or the traceback it raised, or that it ran out of time."""

    value: Any = None
    error: Optional[str] = None
    timed_out: bool = False


class FunctionPool:
    """Runs (spec, keyword arguments) calls in up to `workers` processes at once, each under `timeout_s`.

    Thread-safe. Processes start on first use; `close()` stops them (they also stop with the host).
    """

    def __init__(self, *, timeout_s: float, workers: int):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 (seconds per call)")
        if workers < 1:
            raise ValueError(f"workers={workers}: must be >= 1")
        self.timeout_s = timeout_s
        self._workers = [_Worker() for _ in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for worker in self._workers:
            self._idle.put(worker)

    @property
    def running(self) -> int:
        """How many worker processes are alive."""
        return sum(w.alive for w in self._workers)

    def run(self, calls: list[tuple[str, dict]]) -> list[Outcome]:
        """Call each `(spec, kwargs)`; outcomes in input order."""
        if len(calls) <= 1:
            return [self._call(spec, kwargs) for spec, kwargs in calls]
        with ThreadPoolExecutor(max_workers=min(len(calls), len(self._workers))) as threads:
            return list(threads.map(lambda call: self._call(*call), calls))

    def _call(self, spec: str, kwargs: dict) -> Outcome:
        worker = self._idle.get()
        try:
            return worker.call(spec, kwargs, self.timeout_s)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        """Stop every worker process."""
        for worker in self._workers:
            worker.stop()


class _Worker:
    """One worker process and the functions it has loaded."""

    def __init__(self):
        self.process: Optional[subprocess.Popen] = None
        self.loaded: set[str] = set()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def call(self, spec: str, kwargs: dict, timeout_s: float) -> Outcome:
        if not self.alive:
            self.process, self.loaded = _start(), set()
        if spec not in self.loaded:
            reply = self._request({"load": spec}, _STARTUP_TIMEOUT_S)
            if reply is None or "error" in reply:
                self.stop()
                raise RuntimeError(f"a reward worker could not load {spec!r} within {_STARTUP_TIMEOUT_S} s: "
                                   f"{'it did not answer' if reply is None else reply['error']}")
            self.loaded.add(spec)
        reply = self._request({"call": spec, "kwargs": kwargs}, timeout_s)
        if reply is None:
            self.stop()  # a call that outlives its deadline takes the worker with it
            return Outcome(timed_out=True)
        return Outcome(error=reply["error"]) if "error" in reply else Outcome(value=reply["value"])

    def _request(self, message: dict, timeout_s: float) -> Optional[dict]:
        """Send one request; its reply, or None when none came within `timeout_s`."""
        try:
            self.process.stdin.write(json.dumps(message, default=str) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._exited()
        if not select.select([self.process.stdout], [], [], timeout_s)[0]:
            return None
        line = self.process.stdout.readline()
        return json.loads(line) if line else self._exited()

    def _exited(self):
        self.stop()
        raise RuntimeError(f"a reward worker exited (code {self.process and self.process.returncode}); its error is "
                           f"on stderr above")

    def stop(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait()

    def __del__(self):
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()


def _start() -> subprocess.Popen:
    """A worker that imports what this process can import: its sys.path travels as PYTHONPATH."""
    path = [str(Path(__file__).resolve().parents[2])] + [entry or os.getcwd() for entry in sys.path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_s2l.algo.reward_pool", str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)


def _exit_with(parent: int) -> None:
    """Stop this worker once `parent` is gone, even killed by SIGKILL: a forked sibling of the parent may
    still hold this worker's stdin open, so end-of-input alone would not stop it. (Linux's parent-death
    signal would fire when the *thread* that started the worker ends, which pool threads do.)"""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _serve(parent: int) -> None:
    """Worker loop: one JSON request per line ({"load": spec} or {"call": spec, "kwargs": {...}}), one reply."""
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a reward function's prints go to stderr, not into replies
    functions: dict[str, tuple[Callable, Optional[tuple[str, ...]]]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "load" in request:
                function = load_function(request["load"])
                functions[request["load"]] = function, reward_parameters(function)
                reply = {"loaded": True}
            else:
                function, names = functions[request["call"]]
                reply = {"value": function(**_arguments(request["kwargs"], names))}
        except Exception:
            reply = {"error": traceback.format_exc()}
        replies.write(json.dumps(reply, default=_jsonable) + "\n")


def _arguments(kwargs: dict, names: Optional[tuple[str, ...]]) -> dict:
    """The call's keyword arguments, verl's aliases added, restricted to the ones the function takes."""
    extra = kwargs.get("extra") or {}
    everything = dict(kwargs, solution_str=kwargs.get("response"), extra_info=extra.get("extra_info"))
    return {name: everything.get(name) for name in (REWARD_ARGUMENTS if names is None else names)}


def _jsonable(value: Any) -> Any:
    """numpy scalars and the like as numbers; anything else as its text (the scorer then rejects it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

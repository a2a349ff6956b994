"""Verifiable math rewards: 1.0 when a response's final answer equals the ground truth, else 0.0.

The answer is the content of the response's last `\\boxed{...}`. Most answers in a training step are
short numbers, so a cheap exact comparison decides them in microseconds: equal normalised strings,
or two plain numbers (integers, decimals, a/b) with the same exact value, score 1; two different
integers score 0. Everything else (LaTeX, expressions, sets, decimals against fractions, responses
without a box) goes to math-verify, whose parsing (sympy) can take unbounded time on pathological
input. Its checks therefore run in a worker subprocess with a hard deadline: on timeout the worker is
killed and replaced, the answer scores 0 and the timeout is counted. A subprocess (not a thread or
SIGALRM) works from any thread and in any host process, and it needs no `__main__` guard.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple, Optional

_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_FRACTION = re.compile(r"[-+]?\d+/\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d*)?")
_STARTUP_TIMEOUT_S = 120.0  # generous: CI machines are shared
# Wrappers that never change an answer's value: math mode, \left/\right, thin spaces, whitespace.
_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\$|\s")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _normalise(answer: str) -> str:
    answer = _NOISE.sub("", answer)
    answer = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", answer)  # \frac{1}{2} -> 1/2
    if _THOUSANDS.fullmatch(answer):  # 1,000 but not the pair 1,2
        answer = answer.replace(",", "")
    return answer.rstrip(".")


def _exact_value(answer: str) -> Optional[Fraction]:
    """The exact value of a plain number (42, -3.5, 1/2), else None."""
    if _NUMBER.fullmatch(answer) or _FRACTION.fullmatch(answer):
        try:
            return Fraction(answer)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def quick_match(answer: str, ground_truth: str) -> Optional[bool]:
    """Decide equality cheaply where that is certain, else None (ask math-verify).

    True: the normalised strings are equal, or both are plain numbers of the same exact value.
    False: both are integers and differ (math-verify never equates distinct integers). Decimals that
    differ are left undecided because math-verify equates values equal after rounding (0.333333, 1/3).
    """
    a, g = _normalise(answer), _normalise(ground_truth)
    if a == g:
        return True if a else None  # an empty box is not an answer
    va, vg = _exact_value(a), _exact_value(g)
    if va is None or vg is None:
        return None
    if va == vg:
        return True
    return False if va.denominator == 1 == vg.denominator and "." not in a + g and "/" not in a + g else None


class ScoreResult(NamedTuple):
    """Scores (1.0/0.0) in input order and how many verifications hit the time limit (scored 0)."""

    scores: list[float]
    timeouts: int


class MathScorer:
    """Scores math answers; math-verify runs in one lazily started worker process with a deadline.

    Thread-safe (one verification at a time goes to the worker). Call `close()` to stop the worker;
    it also stops with the host process.
    """

    def __init__(self, timeout_s: float = 5.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 (seconds per math-verify check)")
        self.timeout_s = timeout_s
        self._worker: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()

    def score(self, responses: list[str], ground_truths: list[str]) -> ScoreResult:
        """Score each response against its ground truth (same length lists)."""
        verdicts = self.verdicts(responses, ground_truths)
        return ScoreResult([1.0 if v else 0.0 for v in verdicts], sum(v is None for v in verdicts))

    def verdicts(self, responses: list[str], ground_truths: list[str]) -> list[Optional[bool]]:
        """Per response: equal to its ground truth, or None when the verification ran out of time."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths: pass one "
                             f"ground truth per response")
        verdicts = []
        for response, truth in zip(responses, ground_truths):
            boxed = last_boxed(response)
            decided = None if boxed is None else quick_match(boxed, truth)
            verdicts.append(self._verify(response, truth) if decided is None else decided)
        return verdicts

    def _verify(self, response: str, ground_truth: str) -> Optional[bool]:
        """math-verify's verdict, or None when it did not answer within the deadline."""
        with self._lock:
            if self._worker is None or self._worker.poll() is not None:
                self._worker = _start_worker()
            worker = self._worker
            worker.stdin.write(json.dumps([response, ground_truth]) + "\n")
            worker.stdin.flush()
            if not select.select([worker.stdout], [], [], self.timeout_s)[0]:
                self._stop(worker)  # a check that outlives its deadline takes the worker with it
                return None
            line = worker.stdout.readline()
            if not line:
                self._stop(worker)
                raise RuntimeError(f"the math-verify worker exited (code {worker.returncode}); its error is "
                                   f"on stderr above")
            return json.loads(line)

    def _stop(self, worker: subprocess.Popen) -> None:
        worker.kill()
        worker.wait()
        self._worker = None

    def close(self) -> None:
        """Stop the worker process, if one is running."""
        with self._lock:
            if self._worker is not None:
                self._stop(self._worker)

    def __del__(self):
        worker = getattr(self, "_worker", None)  # absent when __init__ raised
        if worker is not None and worker.poll() is None:
            worker.kill()


def _die_with_parent() -> None:
    """Linux: the worker is killed when its parent dies, even by SIGKILL (a forked sibling may still hold
    the worker's stdin open, so end-of-input alone would not stop it)."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _start_worker() -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the megatron_s2l package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "megatron_s2l.algo.rewards"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, bufsize=1, env=env, preexec_fn=_die_with_parent)
    # Importing math-verify (sympy) takes about a second: wait for it here, outside any check's deadline.
    ready = select.select([worker.stdout], [], [], _STARTUP_TIMEOUT_S)[0] and worker.stdout.readline()
    if ready != "ready\n":
        worker.kill()
        worker.wait()
        raise RuntimeError(f"the math-verify worker did not start within {_STARTUP_TIMEOUT_S} s (exit code "
                           f"{worker.returncode}); is math-verify installed? Its error is on stderr above")
    return worker


def _serve() -> None:
    """Worker loop: read [response, ground_truth] JSON lines, write math-verify's verdict per line."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeout
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        response, truth = json.loads(line)
        try:
            # Its own SIGALRM timeouts are off: the parent enforces the deadline by killing this process.
            gold = parse(f"\\boxed{{{truth}}}", parsing_timeout=None)
            verdict = bool(verify(gold, parse(response, parsing_timeout=None), timeout_seconds=None))
        except Exception:  # malformed LaTeX is a wrong answer, not a crash
            verdict = False
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_DEFAULT: dict[float, MathScorer] = {}  # one shared scorer per timeout, for math_reward
_DEFAULT_LOCK = threading.Lock()


def math_reward(response: str, ground_truth: str, *, timeout_s: float = 5.0) -> float:
    """1.0 if the response's final answer equals `ground_truth` (math-verify equivalence), else 0.0.

    Uses a shared `MathScorer` per timeout; a verification that exceeds `timeout_s` scores 0. Use a
    `MathScorer` directly to also count the timeouts.
    """
    with _DEFAULT_LOCK:
        if timeout_s not in _DEFAULT:
            _DEFAULT[timeout_s] = MathScorer(timeout_s)
    return _DEFAULT[timeout_s].score([response], [ground_truth]).scores[0]


if __name__ == "__main__":
    _serve()

"""math-verify's equivalence check, as the reward workers load it (importing math-verify costs a second).

Only worker processes import this module (`algo.rewards.MATH_VERIFY` names it); the host process never
pays for sympy.
"""

import logging

from math_verify import parse, verify

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its own timeouts are off


def equivalent(response: str, ground_truth: str) -> bool:
    """True when the response's final answer equals `ground_truth` by math-verify; malformed LaTeX is False."""
    try:
        # Its SIGALRM timeouts are off: the worker pool enforces the deadline by killing the process.
        gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=None)
        return bool(verify(gold, parse(response, parsing_timeout=None), timeout_seconds=None))
    except Exception:  # malformed LaTeX is a wrong answer, not a crash
        return False

"""Reward functions as users write them, loaded by spec (`tests.unit.user_rewards:<name>`) in the reward tests."""

import time
import uuid
from pathlib import Path


def tagged_answer(response, ground_truth):
    """1 when the response holds <answer>ground_truth</answer>."""
    return float(f"<answer>{ground_truth}</answer>" in response)


def with_metrics(response, ground_truth, data_source, prompt, extra):
    """A dict: the score and extra metrics computed from every argument."""
    return {"score": float(ground_truth in response), "response_chars": len(response),
            "difficulty": extra["difficulty"], "prompt_chars": len(prompt), "is_code": data_source == "code"}


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature: 0.5 per matching field."""
    return 0.5 * (ground_truth in solution_str) + 0.5 * (extra_info == {"split": "train"})


def raises(response):
    if "boom" in response:
        raise ValueError(f"cannot score {response!r}")
    return 1.0


def hangs(response):
    if "hang" in response:
        time.sleep(600)
    return 1.0


def prints(response):
    """Prints while scoring, as reward functions under development do."""
    print(f"scoring {response!r}")
    return 1.0


def returns_text(response):
    return "yes"


def needs_a_tokenizer(response, tokenizer):
    return 1.0


def rendezvous(response, extra):
    """Leaves a mark in extra["dir"] and waits up to extra["wait_s"] for extra["n"] marks: 1 when all calls
    of the batch were running at the same time, 0 when this one waited alone."""
    folder = Path(extra["dir"])
    (folder / uuid.uuid4().hex).touch()
    deadline = time.monotonic() + extra["wait_s"]
    while time.monotonic() < deadline:
        if len(list(folder.iterdir())) >= extra["n"]:
            return 1.0
        time.sleep(0.05)
    return 0.0

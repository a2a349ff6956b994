"""Prompt datasets as users have them, and a deterministic, resumable order over them.

Two formats, one row schema:
  - verl-style Parquet (DAPO-17k, MATH as verl prepares them): `prompt` is a chat list of
    {role, content}, `reward_model.ground_truth` the answer, `data_source` the benchmark name;
  - JSONL, one object per line: `prompt` (a string or a chat list) or `question`, and `answer`,
    `ground_truth` or `reward_model.ground_truth` (a string or a number).
An optional `prompt_id` (or `id`) names a row; otherwise it is `<file stem>-<line or row>`. The
row's other fields (the answer's among them, `extra_info`, anything a reward function needs) are kept
as the file has them in `Prompt.extra`.

Every row is checked: malformed JSON, a row that is not an object, missing or empty prompt or answer,
undecodable bytes, a duplicate id, and prompts longer than `max_prompt_length` tokens (after the
template) stop loading with the file and line (Parquet: the 0-based row) -- or, with
`on_bad_prompt="drop"`, are skipped and listed in `LoadedPrompts.dropped`. A UTF-8 byte-order mark
and blank lines are fine. `PromptStream` serves the prompts epoch by epoch in a seeded shuffle whose
position is saved with checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, get_args

from megatron_s2l.config import ConfigError, DataConfig
from megatron_s2l.constants import OnBadPrompt
from megatron_s2l.data.task import DATA_SOURCE, Problem, task_splits
from megatron_s2l.data.tokenizer import PromptTokenizer, render_prompt
from megatron_s2l.types import Prompt

ON_BAD_PROMPT = get_args(OnBadPrompt)
# Fields a Prompt holds in its own attributes; the others travel in Prompt.extra to reward functions.
_ROW_FIELDS = ("prompt", "question", "prompt_id", "id", "data_source")


class PromptFileError(ConfigError):
    """A bad row in a prompt file; the message starts with `file:line` (or `file: row N`). A mistake in the
    user's data, reported like one in the config: one line, no traceback."""


@dataclass
class LoadedPrompts:
    """The prompts of one file and the rows dropped under on_bad_prompt='drop'."""

    prompts: list[Prompt]
    dropped: list[str] = field(default_factory=list)  # "file:line: why" per skipped row


class _BadRow(Exception):
    """Internal: why one row is unusable (the caller adds where)."""


def load_prompts(path: str | Path, tokenizer: PromptTokenizer, *, template: str, max_prompt_length: int,
                 on_bad_prompt: str = "error") -> LoadedPrompts:
    """Load a JSONL (.jsonl, .json) or verl Parquet (.parquet) prompt file, template applied and tokenised."""
    path = Path(path)
    if on_bad_prompt not in ON_BAD_PROMPT:
        raise ValueError(f"on_bad_prompt={on_bad_prompt!r}: accepted values are {list(ON_BAD_PROMPT)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path)
    else:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}; accepted: .jsonl, .json "
                              f"(one JSON object per line) or .parquet (verl format)")
    loaded = LoadedPrompts(prompts=[])
    seen: set[str] = set()
    for where, default_id, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise row
            prompt = _prompt_from_row(row, default_id, tokenizer, template, max_prompt_length)
            if prompt.prompt_id in seen:
                raise _BadRow(f"duplicate prompt_id {prompt.prompt_id!r}: ids must be unique within a file")
        except _BadRow as bad:
            message = f"{where}: {bad}"
            if on_bad_prompt == "error":
                raise PromptFileError(f"{message} (fix the row, or set data.on_bad_prompt=drop to skip bad "
                                      f"rows)") from None
            loaded.dropped.append(message)
            continue
        seen.add(prompt.prompt_id)
        loaded.prompts.append(prompt)
    if not loaded.prompts:
        raise PromptFileError(f"{path}: no usable prompts ({len(loaded.dropped)} rows dropped)")
    return loaded


def _jsonl_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(where, default id, parsed object or _BadRow) per non-blank line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, "", _BadRow(f"bytes that are not UTF-8 at column {e.start + 1} ({raw[e.start:e.end]!r}); "
                                     f"re-encode the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield where, f"{path.stem}-{number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield where, "", _BadRow(f"malformed JSON ({e.msg} at column {e.colno})")


def _parquet_rows(path: Path) -> Iterator[tuple[str, str, Any]]:
    """(where, default id, row dict) per Parquet row; `where` names the 0-based row."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {index}", f"{path.stem}-{index}", row


def _prompt_from_row(row: Any, default_id: str, tokenizer: PromptTokenizer, template: str,
                     max_prompt_length: int) -> Prompt:
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object per line, got {type(row).__name__}")
    messages = _messages(row)
    ground_truth = _ground_truth(row)
    try:
        text = render_prompt(messages, template, tokenizer)
    except ValueError as e:
        raise _BadRow(str(e)) from None
    prompt_ids = tokenizer.encode(text)
    if len(prompt_ids) > max_prompt_length:
        raise _BadRow(f"prompt is {len(prompt_ids)} tokens, over data.max_prompt_length={max_prompt_length} "
                      f"(raise it or shorten the prompt)")
    prompt_id = row.get("prompt_id", row.get("id"))
    data_source = row.get("data_source") or ""
    if not isinstance(data_source, str):
        raise _BadRow(f"data_source must be a string, got {data_source!r}")
    return Prompt(prompt_id=default_id if prompt_id in (None, "") else str(prompt_id), prompt_ids=prompt_ids,
                  ground_truth=ground_truth, text=text, data_source=data_source,
                  extra={k: v for k, v in row.items() if k not in _ROW_FIELDS})


def _messages(row: dict) -> list[dict]:
    """The chat messages of a row: `prompt` (chat list or string) or `question` (string)."""
    key = "prompt" if "prompt" in row else "question" if "question" in row else None
    if key is None:
        raise _BadRow(f"missing field 'prompt' (or 'question'); the row has {sorted(row)}")
    value = _text(row[key], key)
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"empty {key!r}")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _BadRow(f"{key!r} must be a non-empty string or chat list of {{role, content}}, got {value!r}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise _BadRow(f"{key}[{i}] must be {{'role': str, 'content': str}}, got {message!r}")
        if not message["content"].strip():
            raise _BadRow(f"{key}[{i}] has empty content")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _ground_truth(row: dict) -> str:
    """The answer of a row: reward_model.ground_truth, answer or ground_truth, as a non-empty string."""
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        key, value = "reward_model.ground_truth", reward_model["ground_truth"]
    elif "answer" in row:
        key, value = "answer", row["answer"]
    elif "ground_truth" in row:
        key, value = "ground_truth", row["ground_truth"]
    else:
        raise _BadRow("missing field 'answer' (or 'ground_truth', 'reward_model.ground_truth')")
    value = _text(value, key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"{key} must be a non-empty string or a number, got {value!r}")
    return value.strip()


def _text(value: Any, key: str) -> Any:
    """Parquet binary columns arrive as bytes: decode them or report undecodable bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRow(f"{key}: bytes that are not UTF-8 at offset {e.start}") from None
    return value


def task_prompts(problems: Iterable[Problem], tokenizer: PromptTokenizer, *, template: str) -> list[Prompt]:
    """Prompts of generated task problems (data.task), template applied."""
    prompts = []
    for p in problems:
        text = render_prompt([{"role": "user", "content": p.question}], template, tokenizer)
        prompts.append(Prompt(prompt_id=p.problem_id, prompt_ids=tokenizer.encode(text), ground_truth=p.answer,
                              text=text, data_source=DATA_SOURCE))
    return prompts


def prompts_from_config(data: DataConfig, tokenizer: PromptTokenizer, split: str) -> LoadedPrompts:
    """The train or eval prompts the config names: a file (`data.train_path`/`eval_path`) or the demo task."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: accepted values are 'train', 'eval'")
    path = data.train_path if split == "train" else data.eval_path
    if path is not None:
        return load_prompts(path, tokenizer, template=data.prompt_template,
                            max_prompt_length=data.max_prompt_length, on_bad_prompt=data.on_bad_prompt)
    train, held_out = task_splits(data.task, seed=data.seed)
    return LoadedPrompts(task_prompts(train if split == "train" else held_out, tokenizer,
                                      template=data.prompt_template))


class PromptStream:
    """Prompts in a seeded shuffle, reshuffled every epoch; its position is part of a checkpoint.

    `next_batch(n)` continues across epoch boundaries. `state_dict()` / `load_state_dict()` save and
    restore the position, so a resumed run draws exactly the prompts an uninterrupted run would.
    """

    def __init__(self, prompts: Sequence[Prompt], *, seed: int):
        if not prompts:
            raise ValueError("PromptStream needs at least one prompt")
        self._prompts = list(prompts)
        self._seed = seed
        self._fingerprint = hashlib.sha256("\n".join(p.prompt_id for p in self._prompts).encode()).hexdigest()[:16]
        self._epoch, self._position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._prompts)))
        random.Random(f"{self._seed}:{epoch}").shuffle(order)
        return order

    @property
    def epoch(self) -> int:
        return self._epoch

    def next_batch(self, n: int) -> list[Prompt]:
        """The next `n` prompts (a batch may span two epochs)."""
        batch = []
        while len(batch) < n:
            if self._position == len(self._order):
                self._epoch, self._position = self._epoch + 1, 0
                self._order = self._epoch_order(self._epoch)
            batch.append(self._prompts[self._order[self._position]])
            self._position += 1
        return batch

    def state_dict(self) -> dict:
        """The position (epoch, index in it) and what it is valid for (seed, the prompt ids' fingerprint)."""
        return {"epoch": self._epoch, "position": self._position, "seed": self._seed,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed and the prompt set must be the ones it was saved with."""
        if state["seed"] != self._seed or state["fingerprint"] != self._fingerprint:
            raise ValueError(f"prompt stream state was saved with seed={state['seed']} and prompt set "
                             f"{state['fingerprint']}, this stream has seed={self._seed} and prompt set "
                             f"{self._fingerprint}: resume with the same data files and data.seed")
        self._epoch, self._position = state["epoch"], state["position"]
        self._order = self._epoch_order(self._epoch)

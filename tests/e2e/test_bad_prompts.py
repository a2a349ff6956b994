"""A bad prompt file stops `examples/pretrain_s2l.py` at start-up, naming the file and line, before any
rollout engine starts, training step runs or checkpoint is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, job_env, tiny_config, write_config

pytestmark = pytest.mark.e2e

GOOD = b'{"prompt_id": "a", "question": "1+1", "answer": "2"}\n'
CASES = {  # (the loader's unit tests cover every kind of bad row) file content -> the line and message the run must stop with
    "malformed_json": (GOOD + b'{"question": "1+2", "answer": "3"\n', ":2: malformed JSON"),
    "non_utf8": (GOOD + GOOD.replace(b'"a"', b'"b"') + b'{"question": "1\xff2", "answer": "3"}\n',
                 ":3: bytes that are not UTF-8"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_prompt_file_stops_with_file_and_line(tiny_family, tmp_path, case):
    content, expected = CASES[case]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(content)
    base = tiny_config(tiny_family)
    config = write_config(tiny_config(tiny_family, data=base["data"] | {"train_path": str(prompts)},
                                      checkpoint={"save_dir": str(tmp_path / "ckpt")}), tmp_path / "bad.yaml")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "pretrain_s2l.py"), "--config", str(config)],
                          env=job_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2  # a mistake in the user's data: one line, no traceback
    assert f"pretrain_s2l.py: error: {prompts}{expected}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "vllm" not in done.stdout.lower() and not (tmp_path / "ckpt").exists()  # stopped before any engine

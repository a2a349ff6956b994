"""tools/evaluate.py end to end on real vLLM (CPU): two tiny random models compared on a task benchmark."""

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from megatron_s2l.algo.rewards import math_reward  # noqa: E402
from megatron_s2l.config import TaskConfig  # noqa: E402
from megatron_s2l.data.task import generate_problems, task_splits, write_jsonl  # noqa: E402
from megatron_s2l.data.tokenizer import train_tokenizer  # noqa: E402
from tests.tiny_models import write_tiny_model  # noqa: E402
from tools import evaluate as cli  # noqa: E402

pytestmark = pytest.mark.vllm
K = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    problems = generate_problems(300, TaskConfig(), seed=0)
    tokenizer = train_tokenizer([p.question for p in problems] + [p.solution for p in problems], vocab_size=512)
    for name, layers in (("explorer", 1), ("learner", 2)):
        write_tiny_model(root / name, num_layers=layers, seed=layers, init_std=0.5)
        tokenizer.save(root / name)
    _, held_out = task_splits(TaskConfig(num_train=1, num_eval=5), seed=7)
    bench = write_jsonl(held_out, root / "heldout.jsonl")
    return root, bench, held_out


def argv(root, bench, labels=("explorer", "learner")):
    return ["--compare", *(f"{label}={root / label}" for label in labels), "--bench", str(bench),
            "--out", str(root / "out"), "--k", str(K), "--max-new-tokens", "12", "--max-model-len", "128",
            "--kv-cache-mb", "64", "--dtype", "float32", "--max-prompt-length", "64"]


def test_compare_run_and_resume(setup, capsys):
    root, bench, held_out = setup
    cli.main(argv(root, bench))
    out = root / "out"
    for label in ("explorer", "learner"):
        results = json.loads((out / label / "results.json").read_text())
        assert results["settings"]["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                   "presence_penalty": 1.5, "max_new_tokens": 12}
        lines = [json.loads(line) for line in (out / label / "samples.jsonl").read_text().splitlines()]
        assert [r["prompt_id"] for r in lines] == [p.problem_id for p in held_out]
        for row, problem in zip(lines, held_out):
            assert len(row["responses"]) == len(row["rewards"]) == K and row["ground_truth"] == problem.answer
            assert row["rewards"] == [math_reward(text, problem.answer) for text in row["responses"]]
        correct = [sum(r["rewards"]) for r in lines]
        hand = {str(k): sum(1 - comb(K - int(c), k) / comb(K, k) for c in correct) / len(correct)
                for k in range(1, K + 1)}
        assert results["benchmarks"]["heldout"]["pass@k"] == pytest.approx(hand)
        assert (out / label / "passk.png").is_file()
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "compare.md").read_text()
    assert capsys.readouterr().out.endswith(table)
    rows = table.splitlines()[2:]
    assert rows[0].startswith("| heldout | explorer | 5 |") and rows[1].startswith("| heldout | learner | 5 |")

    # Drop the last two problems of the learner (an interrupted run) and rerun: the same samples come back.
    samples = out / "learner" / "samples.jsonl"
    full = samples.read_text()
    samples.write_text("".join(full.splitlines(keepends=True)[:3]))
    cli.main(argv(root, bench, labels=("learner",)))
    assert samples.read_text() == full


def test_a_megatron_checkpoint_evaluates_like_its_hf_model(setup, tmp_path):
    """--model may be a Megatron checkpoint: converted to HF first, it samples exactly what the HF model does."""
    root, bench, _ = setup
    tools = Path(cli.__file__).resolve().parent
    checkpoint = tmp_path / "learner_mcore"
    subprocess.run([sys.executable, str(tools / "convert_hf_to_megatron.py"), "--hf-dir", str(root / "learner"),
                    "--save-dir", str(checkpoint)], check=True, timeout=300)
    common = ["--bench", str(bench), "--k", str(K), "--max-new-tokens", "12", "--max-model-len", "128",
              "--kv-cache-mb", "64", "--dtype", "float32", "--max-prompt-length", "64"]
    cli.main(["--model", str(root / "learner"), "--out", str(tmp_path / "from_hf"), *common])
    cli.main(["--model", str(checkpoint), "--hf-config", str(root / "learner"), "--tokenizer-dir",
              str(root / "learner"), "--out", str(tmp_path / "from_mcore"), *common])
    from_hf = (tmp_path / "from_hf" / "samples.jsonl").read_text()
    from_mcore = (tmp_path / "from_mcore" / "samples.jsonl").read_text()
    assert from_mcore == from_hf and from_hf

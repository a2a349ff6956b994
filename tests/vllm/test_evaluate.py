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


def test_a_training_configs_reward_section_scores_the_samples(setup, tmp_path, capsys):
    """--reward-config: pass@k counts what training rewards (here a file's function for the task's data source)."""
    root, bench, held_out = setup
    (tmp_path / "parity.py").write_text("def even_length(response):\n    return float(len(response) % 2 == 0)\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"reward:\n  by_data_source:\n    s2l_arith: {tmp_path / 'parity.py'}:even_length\n")
    common = ["--model", str(root / "learner"), "--bench", str(bench), "--k", str(K), "--max-new-tokens", "12",
              "--max-model-len", "128", "--kv-cache-mb", "64", "--dtype", "float32", "--max-prompt-length", "64"]
    cli.main([*common, "--out", str(tmp_path / "out"), "--reward-config", str(config)])
    lines = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in lines] == [p.problem_id for p in held_out]
    rewards = [r for row in lines for r in row["rewards"]]
    assert rewards == [float(len(text) % 2 == 0) for row in lines for text in row["responses"]]
    assert 0 < sum(rewards) < len(rewards)  # both outcomes occur, so the check can tell the functions apart
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["reward"]["by_data_source"] == {"s2l_arith": f"{tmp_path / 'parity.py'}:even_length"}

    config.write_text("reward:\n  function: tests.unit.user_rewards:no_such_function\n  timeout_s: 0\n"
                      "loss: {kl_typ: k1}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.main([*common, "--out", str(tmp_path / "bad"), "--reward-config", str(config)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "evaluate.py: error: 2 problems:",
        f"  - --reward-config {config}: reward.timeout_s=0.0: must be > 0 (seconds per reward call)",
        f"  - --reward-config {config}: reward.function: 'tests.unit.user_rewards:no_such_function': "
        f"'no_such_function' in tests.unit.user_rewards is not found"]
    assert not (tmp_path / "bad").exists()  # refused before a model is served

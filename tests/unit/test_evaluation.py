"""pass@k evaluation with a scripted engine: the estimator by hand, resume, settings, reports."""

import json
from math import comb

import pytest

from megatron_s2l.config import SamplingConfig
from megatron_s2l.evaluation.passk_eval import (evaluate, passk_table, report_ks, sampling_preset,
                                                write_comparison)
from megatron_s2l.types import Prompt, Sample

# problem -> number of correct samples out of K
CORRECT = {"a": 0, "b": 1, "c": 2, "d": 4}
K = 4
SAMPLING = sampling_preset("nothink", max_new_tokens=16)


def decode(ids):
    return "".join(map(chr, ids))


class ScriptedEngine:
    """The first CORRECT[id] samples of a prompt answer its ground truth, the others a wrong number."""

    def __init__(self, fail_after_calls=None):
        self.calls, self.fail_after_calls = [], fail_after_calls

    def generate(self, prompts, n, sampling, *, seed=None):
        if self.fail_after_calls is not None and len(self.calls) == self.fail_after_calls:
            raise RuntimeError("simulated crash")
        self.calls.append([p.prompt_id for p in prompts])
        out = []
        for p in prompts:
            texts = [f"so \\boxed{{{p.ground_truth if j < CORRECT[p.prompt_id] else 99}}}" for j in range(n)]
            out.append([Sample(prompt_id=p.prompt_id, prompt_ids=p.prompt_ids, response_ids=[ord(c) for c in t],
                               behaviour_logprobs=[0.0] * len(t), source="learner", policy_id="m",
                               finish_reason="stop" if j else "length") for j, t in enumerate(texts)])
        return out


PROMPTS = [Prompt(prompt_id=i, prompt_ids=[1, 2], ground_truth=str(n)) for n, i in enumerate(CORRECT)]


def run(tmp_path, engine, **kw):
    kw = {"k": K, "sampling": SAMPLING, "decode": decode, "settings": {"model": "m"}, "chunk_size": 2, **kw}
    return evaluate(engine, {"tiny": PROMPTS}, tmp_path, **kw)


def test_passk_by_hand(tmp_path):
    results = run(tmp_path, ScriptedEngine())
    summary = results["benchmarks"]["tiny"]
    # 1 - C(n-c, k) / C(n, k) per problem, averaged: written out for c = 0, 1, 2, 4 of n = 4
    hand = {1: (0 + 1 / 4 + 2 / 4 + 1) / 4,
            2: (0 + (1 - 3 / 6) + (1 - 1 / 6) + 1) / 4,
            3: (0 + (1 - 1 / 4) + 1 + 1) / 4,
            4: (0 + 1 + 1 + 1) / 4}
    assert summary["pass@k"] == pytest.approx({str(k): v for k, v in hand.items()}, abs=1e-12)
    assert hand == pytest.approx({k: sum(1 - comb(K - c, k) / comb(K, k) for c in CORRECT.values()) / 4
                                  for k in range(1, 5)})
    assert summary["mean_reward"] == 7 / 16 and summary["num_problems"] == 4
    assert summary["truncated_fraction"] == 1 / 4  # sample 0 of every problem hit the length limit
    assert results["settings"]["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                               "presence_penalty": 1.5, "max_new_tokens": 16}
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], sum(r["rewards"])) for r in lines] == [(i, c) for i, c in CORRECT.items()]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "passk.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| benchmark | model | problems | pass@1 | pass@2 | pass@4 |"
    assert table[2] == "| tiny | m | 4 | 43.8 | 58.3 | 75.0 |"


def test_interrupted_run_resumes_to_the_same_results(tmp_path):
    reference = run(tmp_path / "ref", ScriptedEngine())
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", ScriptedEngine(fail_after_calls=1))
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 2
    with open(tmp_path / "run" / "samples.jsonl", "a") as f:
        f.write('{"benchmark": "tiny", "prompt_id": "c", "rew')  # a line cut off by the crash
    engine = ScriptedEngine()
    assert run(tmp_path / "run", engine)["benchmarks"] == reference["benchmarks"]
    assert engine.calls == [["c", "d"]]  # only the unfinished problems were sampled
    again = ScriptedEngine()
    run(tmp_path / "run", again)
    assert again.calls == []


def test_other_settings_are_refused(tmp_path):
    run(tmp_path, ScriptedEngine())
    with pytest.raises(ValueError, match=r"other settings \(k differ: recorded \[4\], now \[3\]\)"):
        run(tmp_path, ScriptedEngine(), k=3)


def test_a_dropped_prompt_is_an_error(tmp_path):
    class Dropping(ScriptedEngine):
        def generate(self, prompts, n, sampling, *, seed=None):
            return [[]] + super().generate(prompts[1:], n, sampling, seed=seed)

    with pytest.raises(ValueError, match="prompt 'a' got 0 samples instead of k=4"):
        run(tmp_path, Dropping())


def test_damaged_results_file_names_the_line(tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"benchmark": "tiny"}\n')
    with pytest.raises(ValueError, match=r"samples\.jsonl:1: not a result line"):
        run(tmp_path, ScriptedEngine())


def test_comparison_and_presets(tmp_path):
    a = run(tmp_path / "a", ScriptedEngine())
    b = json.loads(json.dumps(a))
    b["benchmarks"]["tiny"]["pass@k"] = {str(k): 0.5 for k in range(1, 5)}
    paths = write_comparison({"explorer": b, "learner": a}, tmp_path)
    rows = paths["table"].read_text().splitlines()[2:]
    assert rows == ["| tiny | explorer | 4 | 50.0 | 50.0 | 50.0 |", "| tiny | learner | 4 | 43.8 | 58.3 | 75.0 |"]
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads(paths["json"].read_text())) == {"explorer", "learner"}
    assert report_ks(16) == [1, 2, 4, 8, 16] and report_ks(12) == [1, 2, 4, 8, 12] and report_ks(1) == [1]
    assert sampling_preset("think", 8) == SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=8)
    with pytest.raises(ValueError, match="sampling preset 'hot'"):
        sampling_preset("hot", 8)

"""Writes the sample prompt files of this folder (run once; the outputs are committed).

`.venv/bin/python tests/data/make_samples.py` rewrites prompts_good.jsonl, prompts_bad.jsonl and the
three Parquet files. Every row is written here by hand: nothing is downloaded.
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
LONG_QUESTION = "Add them all: " + "+".join(["1"] * 80)


def line(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def write_jsonl():
    good = [
        b"\xef\xbb\xbf" + line({"prompt_id": "p1", "prompt": "What is 2+3? Put the answer in \\boxed{}.",
                                "answer": "5"}),
        b"",
        line({"question": "Compute left to right mod 10: 7+3*4", "answer": 0, "data_source": "s2l_arith"}),
        line({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café: 1+1=?"}],
              "ground_truth": "2"}),
        b"   ",
        line({"id": 17, "prompt": "世界 3*3", "reward_model": {"ground_truth": "9", "style": "rule"}}) + b"\r",
    ]
    (HERE / "prompts_good.jsonl").write_bytes(b"\n".join(good) + b"\n")
    bad = [
        line({"prompt_id": "ok1", "question": "1+1", "answer": "2"}),
        b'{"question": "1+2", "answer": "3"',  # 2: malformed JSON
        line({"answer": "3"}),  # 3: no prompt
        line({"question": "   ", "answer": "3"}),  # 4: empty prompt
        line({"question": "2+2"}),  # 5: no answer
        line({"question": "2+2", "answer": ""}),  # 6: empty answer
        b'{"question": "caf\xe9", "answer": "1"}',  # 7: Latin-1 bytes
        line({"question": LONG_QUESTION, "answer": "80"}),  # 8: too long
        line([1, 2]),  # 9: not an object
        line({"prompt_id": "ok1", "question": "3+3", "answer": "6"}),  # 10: duplicate id
        line({"prompt": [{"role": "user"}], "answer": "1"}),  # 11: chat message without content
        line({"prompt_id": "ok2", "question": "2+3", "answer": "5"}),
    ]
    (HERE / "prompts_bad.jsonl").write_bytes(b"\n".join(bad) + b"\n")


def verl_row(index, content, ground_truth, source="math_dapo"):
    return {"data_source": source, "prompt": [{"role": "user", "content": content}], "ability": "MATH",
            "reward_model": {"ground_truth": ground_truth, "style": "rule"},
            "extra_info": {"index": str(index)}}


def write_parquet():
    good = [verl_row(0, "What is 6*7? Put the answer in \\boxed{}.", "42"),
            verl_row(1, "Compute left to right mod 10: 9-4*3", "5", "s2l_arith"),
            verl_row(2, "How many primes are below 10?", "4")]
    pq.write_table(pa.Table.from_pylist(good), HERE / "prompts_verl.parquet")
    bad = [verl_row(0, "What is 1+1?", "2"),
           verl_row(1, "  ", "3"),  # row 1: empty content
           verl_row(2, "What is 2+2?", None),  # row 2: no ground truth
           verl_row(3, LONG_QUESTION, "80"),  # row 3: too long
           verl_row(4, "What is 3+3?", "6")]
    pq.write_table(pa.Table.from_pylist(bad), HERE / "prompts_verl_bad.parquet")
    binary = pa.table({"question": pa.array([b"What is 5+5?", b"caf\xe9 1+1", b"What is 4+4?"], pa.binary()),
                       "answer": ["10", "2", "8"]})  # row 1: Latin-1 bytes in a binary column
    pq.write_table(binary, HERE / "prompts_binary.parquet")


if __name__ == "__main__":
    write_jsonl()
    write_parquet()

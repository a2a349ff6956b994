"""Names that several layers must spell alike, each written once (the bottom layer: imports nothing).

The allowed values of the enumerated settings that math and data code check too: `config.py` types its
fields with these Literals, and the functions that take the plain values check against
`typing.get_args(...)` of the same Literal. And the file name of the CPU demo's tokenizer inside a
model directory, which the tokenizer writes and reads, the start-up checks compare and the converter
copies.
"""

from __future__ import annotations

from typing import Literal

ScheduleKind = Literal["linear", "cosine", "step", "constant"]
GroupMode = Literal["combined", "separate"]
AdvantageNorm = Literal["std", "none"]
KLType = Literal["k1", "k3", "low_var_kl"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ImportanceCorrection = Literal["none", "tis", "icepop"]
OnBadPrompt = Literal["error", "drop"]
OnRewardError = Literal["raise", "zero"]
PromptTemplate = Literal["chat", "qwen3-base", "qwen3-base-nothink", "raw"]

DEMO_TOKENIZER_FILE = "s2l_tokenizer.model"  # the CPU demo's sentencepiece model, inside a model directory
TASK_OPS = "+-*"  # the operations the demo task's chains may use

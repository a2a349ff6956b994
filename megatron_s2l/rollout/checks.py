"""Start-up checks: the whole config at once, HF checkpoints with readable weights, explorer/learner
tokenizers that agree, and the reward functions a config names.

An explorer whose token ids mean something else than the learner's would silently train the learner
on garbage; a half-copied checkpoint would fail deep inside vLLM; a reward function with a typo in its
name would fail at the first step. All are caught here with the path or field and what is wrong. This
module imports nothing heavy, so entry points check a config in a second, before they import Megatron
and vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_s2l.algo.reward_pool import BUILTIN_MATH, check_function
from megatron_s2l.config import ConfigError, RewardConfig, S2LConfig, raise_problems
from megatron_s2l.constants import DEMO_TOKENIZER_FILE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_config(cfg: S2LConfig, problems: list[str] = (), check_files: bool = True) -> S2LConfig:
    """Raise one ConfigError listing `problems` (from parsing), every problem of `cfg`'s values and, with
    `check_files`, of its paths and of the explorer's tokenizer against the learner's, and of the reward
    functions it names; else return `cfg`.

    Everything a user can get wrong before the first step is found here, at once, before anything slow.
    """
    found = list(problems) + cfg.problems(check_files)
    models = {"learner": cfg.learner.hf_path}
    if cfg.explorer.source == "online":
        models["explorer"] = cfg.explorer.hf_path
    # Only directories that config.json says are models: the others are already reported by the config.
    readable = {role: path for role, path in models.items() if path and (Path(path) / "config.json").is_file()}
    for role, path in readable.items() if check_files else ():
        try:
            check_hf_checkpoint(path, role=role)
        except ValueError as err:
            found.append(str(err))
    if check_files and len(readable) == 2:
        try:
            check_tokenizers_agree(readable["explorer"], readable["learner"])
        except ValueError as err:
            found.append(str(err))
    found += reward_function_problems(cfg.reward)
    raise_problems(found)
    return cfg


def reward_function_problems(reward: RewardConfig, at: str = "reward") -> list[str]:
    """Load every reward function `reward` names and check its signature; one problem per bad field."""
    specs = {f"{at}.function": reward.function}
    if isinstance(reward.by_data_source, dict):  # else the config reports it
        specs.update({f"{at}.by_data_source.{source}": spec for source, spec in reward.by_data_source.items()})
    problems = []
    for where, spec in specs.items():
        if spec != BUILTIN_MATH and isinstance(spec, str) and ":" in spec:  # the config reports malformed specs
            try:
                check_function(spec)
            except ValueError as err:
                problems.append(f"{where}: {err}")
    return problems


def check_hf_checkpoint(path: str | Path, *, role: str = "explorer") -> Path:
    """Check that `path` is a local HF model directory with a valid config.json and readable weights.

    Raises ValueError naming the directory and what is missing or unreadable; returns the path.
    """
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"{role} checkpoint {root}: no such directory (expected a local HF model directory "
                          f"with config.json and *.safetensors)")
    config = root / "config.json"
    if not config.is_file():
        raise ConfigError(f"{role} checkpoint {root}: config.json is missing (copy the whole HF directory)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{role} checkpoint {config}: not valid JSON ({err}); the file is corrupt") from None
    shards = sorted(root.glob("*.safetensors"))
    if not shards:
        others = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {others}: convert them to safetensors)" if others else ""
        raise ConfigError(f"{role} checkpoint {root}: no *.safetensors weights{hint}")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(wanted - {p.name for p in shards})
        if missing:
            raise ConfigError(f"{role} checkpoint {root}: weight shards {missing} listed in {index.name} are missing")
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for truncated headers
            raise ConfigError(f"{role} checkpoint {shard}: unreadable weights ({err}); the file is corrupt or "
                              f"truncated, copy it again") from None
    return root


def has_tokenizer(path: str | Path) -> bool:
    """Whether an HF directory carries tokenizer files."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizers_agree(explorer_path: str | Path, learner_path: str | Path) -> bool:
    """Raise ValueError if the explorer's and learner's tokenizers differ in vocabulary, special tokens
    or chat template; return False (nothing compared) when either directory has no tokenizer files."""
    demo_e, demo_l = Path(explorer_path) / DEMO_TOKENIZER_FILE, Path(learner_path) / DEMO_TOKENIZER_FILE
    if demo_e.is_file() or demo_l.is_file():  # the demo family's sentencepiece model: one file says it all
        if not (demo_e.is_file() and demo_l.is_file() and demo_e.read_bytes() == demo_l.read_bytes()):
            raise ConfigError(f"explorer tokenizer ({demo_e}) and learner tokenizer ({demo_l}) differ or one is "
                              f"missing: build both models of the family with the same tokenizer")
        return True
    if not (has_tokenizer(explorer_path) and has_tokenizer(learner_path)):
        return False
    from transformers import AutoTokenizer

    tokenizers = {role: AutoTokenizer.from_pretrained(str(path))
                  for role, path in (("explorer", explorer_path), ("learner", learner_path))}
    problems = []
    vocab_e, vocab_l = (tokenizers[r].get_vocab() for r in ("explorer", "learner"))
    if vocab_e != vocab_l:
        differing = sorted(set(vocab_e.items()) ^ set(vocab_l.items()), key=lambda kv: kv[1])[:5]
        problems.append(f"vocabularies differ (sizes {len(vocab_e)} vs {len(vocab_l)}; first differing "
                        f"(token, id) pairs: {differing})")
    specials_e, specials_l = (_special_tokens(tokenizers[r]) for r in ("explorer", "learner"))
    if specials_e != specials_l:
        keys = sorted(k for k in specials_e.keys() | specials_l.keys() if specials_e.get(k) != specials_l.get(k))
        problems.append("special tokens differ: " + ", ".join(
            f"{k}: {specials_e.get(k)!r} vs {specials_l.get(k)!r}" for k in keys))
    if tokenizers["explorer"].chat_template != tokenizers["learner"].chat_template:
        problems.append("chat templates differ")
    if problems:
        raise ConfigError(f"explorer tokenizer ({explorer_path}) and learner tokenizer ({learner_path}) disagree: "
                         + "; ".join(problems) + ". Explorer samples are token ids the learner trains on, so "
                         "both must share one tokenizer: pick an explorer from the learner's model family")
    return True


def _special_tokens(tokenizer) -> dict[str, tuple]:
    """Each named special token with its id, and the full set of added special tokens."""
    named = {name: (tok, tokenizer.convert_tokens_to_ids(tok))
             for name, tok in tokenizer.special_tokens_map.items() if isinstance(tok, str)}
    named["all_special"] = tuple(sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)))
    return named

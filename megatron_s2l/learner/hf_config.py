"""config.json <-> ModelConfig for the Hugging Face families the mapping covers (Qwen3, Qwen2, Llama).

A config.json this mapping cannot represent is a ConfigError (the user's checkpoint, not a bug: no traceback).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from megatron_s2l.config import HF_ARCHITECTURES, HF_CONFIG_KEYS, ConfigError, ModelConfig


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """ModelConfig of a local HF Qwen3, Qwen2 or Llama checkpoint (a directory with config.json, or the file).

    Raises ConfigError naming the file and field for architectures this mapping cannot represent.
    """
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: no such file; expected a local Hugging Face model directory "
                          f"with config.json (hub ids are not downloaded)")
    cfg = model_config_from_dict(json.loads(config_file.read_text()), str(config_file))
    return dataclasses.replace(cfg, hf_path=str(config_file.parent))


def model_config_from_dict(hf: Mapping, source: str = "config.json") -> ModelConfig:
    """ModelConfig of the parsed config.json `hf` of a Qwen3, Qwen2 or Llama model; `source` names it in errors."""
    family = hf.get("model_type")
    if family not in HF_ARCHITECTURES:
        raise ConfigError(f"{source}: model_type={family!r} (architectures={hf.get('architectures')}) is "
                          f"not supported; accepted: {sorted(HF_ARCHITECTURES)} "
                          f"(use --backend bridge for other architectures)")
    unsupported = {"hidden_act": ("silu", hf.get("hidden_act", "silu")),
                   "attention_bias": (False, hf.get("attention_bias", False)),
                   "mlp_bias": (False, hf.get("mlp_bias", False)),
                   "use_sliding_window": (False, hf.get("use_sliding_window", False)),
                   "rope type": ("default", _rope(hf)[1])}
    for field_name, (accepted, value) in unsupported.items():
        if value != accepted:
            raise ConfigError(f"{source}: {field_name}={value!r} is not supported by the megatron-s2l "
                              f"mapping (accepted: {accepted!r}); convert with --backend bridge instead")
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {missing}; a {family} config.json needs {list(_REQUIRED)}")
    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        **{name: hf[HF_CONFIG_KEYS[name]] for name in _AS_IS},
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        rotary_base=float(_rope(hf)[0]),
        qk_layernorm=family == "qwen3",
        add_qkv_bias=family == "qwen2",
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )
    problems = cfg.validate(source)
    if family == "qwen2" and cfg.kv_channels * heads != cfg.hidden_size:  # vLLM's Qwen2 ignores head_dim
        problems.append(f"{source}: head_dim={cfg.kv_channels} is not hidden_size / num_attention_heads = "
                        f"{cfg.hidden_size} / {heads}; Qwen2 models derive it, so vLLM would serve another model")
    if problems:
        raise ConfigError(problems)
    return cfg


# ModelConfig fields that config.json states as they are (the others are derived or have defaults).
_AS_IS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
          "max_position_embeddings", "norm_epsilon")
_REQUIRED = tuple(HF_CONFIG_KEYS[name] for name in _AS_IS)


def _rope(hf: Mapping) -> tuple[float, str]:
    """(theta, rope type) from a transformers 5 `rope_parameters` or a legacy `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return params.get("rope_theta", hf.get("rope_theta", 10000.0)), rope_type


def hf_family(cfg: ModelConfig) -> str:
    """The HF family whose architecture `cfg` is: qk-layernorm means Qwen3, q/k/v biases Qwen2, neither Llama."""
    return "qwen3" if cfg.qk_layernorm else "qwen2" if cfg.add_qkv_bias else "llama"


def hf_config(cfg: ModelConfig, family: str | None = None) -> dict:
    """The config.json contents of `cfg` as an HF `family` model (default: `hf_family(cfg)`).

    Writes the rope base both as transformers 5 `rope_parameters` and as the legacy `rope_theta`, so
    older transformers and vLLM releases read the same model.
    """
    family = family or hf_family(cfg)
    if family not in HF_ARCHITECTURES:
        raise ValueError(f"family={family!r}: accepted values are {sorted(HF_ARCHITECTURES)}")
    if (cfg.qk_layernorm, cfg.add_qkv_bias) != (family == "qwen3", family == "qwen2"):
        raise ValueError(f"family={family!r} does not match qk_layernorm={cfg.qk_layernorm}, add_qkv_bias="
                         f"{cfg.add_qkv_bias}: Qwen3 has q/k norms, Qwen2 q/k/v biases and Llama neither; "
                         f"pass family={hf_family(cfg)!r}")
    config = {
        "architectures": [HF_ARCHITECTURES[family]],
        "model_type": family,
        **{HF_CONFIG_KEYS[name]: getattr(cfg, name) for name in _AS_IS},
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }
    # Qwen2's q/k/v biases are implied by its model_type; Llama's attention_bias would add one to o_proj too
    config.update({"use_sliding_window": False, "sliding_window": None} if family != "llama"
                  else {"attention_bias": False, "mlp_bias": False})
    return config


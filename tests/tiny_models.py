"""Tiny random Hugging Face checkpoints for tests and benchmarks, built from configs (never downloaded).

`write_tiny_model(path, ...)` writes config.json, generation_config.json and model.safetensors of a
Qwen3-, Qwen2- or Llama-style causal LM with random weights, in float32. vLLM's CPU attention needs a head_dim
of 32, 64, 80, 96, 112, 128, ...; the defaults use 32. Engines load these directories with
`skip_tokenizer_init` and token ids; `with_tokenizer=True` also writes a word-level tokenizer
(token `t<i>` for id i, plus `<s>`, `</s>`, `<pad>`) for code that compares tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILIES = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def write_tiny_model(path: str | Path, *, family: str = "qwen3", vocab_size: int = 512, hidden_size: int = 128,
                     intermediate_size: int = 384, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                     head_dim: int = 32, tie_word_embeddings: bool = True, max_position_embeddings: int = 512,
                     rope_theta: float = 1_000_000.0, init_std: float = 0.02, seed: int = 0,
                     with_tokenizer: bool = False, chat_template: str | None = None) -> Path:
    """Write a random tiny HF model directory at `path` and return it.

    `seed` fixes the weights; `init_std` scales them (larger values give peakier next-token
    distributions). Token ids 0, 1, 2 are bos, eos, pad.
    """
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_hidden_layers=num_layers, num_attention_heads=num_heads,
                        num_key_value_heads=num_kv_heads, head_dim=head_dim,
                        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
                        rope_theta=rope_theta, initializer_range=init_std, bos_token_id=0, eos_token_id=1,
                        pad_token_id=2, torch_dtype="float32")
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # transformers initialises biases (Qwen2's q/k/v) to zero: make them count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(std=init_std)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        write_tiny_tokenizer(path, vocab_size, chat_template=chat_template)
    return path


def write_tiny_tokenizer(path: str | Path, vocab_size: int, *, chat_template: str | None = None):
    """Write a word-level tokenizer whose id i is `t<i>` (ids 0-2 are <s>, </s>, <pad>) into `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["pad_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)

"""FP8 training through Transformer Engine: FP8Config -> TransformerConfig fields, checked at start-up.

Only the GEMMs of the transformer layers run in FP8 (TE's autocast, driven by megatron-core from these
fields); embeddings, the output layer, log-probs and the loss stay in higher precision, and
`algo.logprobs` accumulates in fp32.
"""

from __future__ import annotations

from megatron_s2l.config import FP8Config

# recipe -> FP8 format. HYBRID (E4M3 forward, E5M2 gradients) is TE's and Megatron's usual choice for
# per-tensor scaling; the block-scaled recipes default to E4M3 everywhere (TE's own defaults).
_FORMATS = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}
# Delayed scaling keeps an amax history; these are the values of Megatron-LM's and NeMo's FP8 recipes.
_DELAYED = {"fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}


def fp8_transformer_fields(fp8: FP8Config, layer_spec: str) -> dict:
    """TransformerConfig keyword arguments for `fp8` ({} when disabled); raises if FP8 cannot run.

    `layer_spec` is ModelConfig.layer_spec: FP8 needs Transformer Engine's layers ("te").
    """
    if not fp8.enabled:
        return {}
    if fp8.recipe not in _FORMATS:
        raise ValueError(f"fp8.recipe={fp8.recipe!r}: accepted values are {sorted(_FORMATS)}")
    if layer_spec != "te":
        raise ValueError(f"fp8.enabled=True needs Transformer Engine layers, but learner.layer_spec="
                         f"{layer_spec!r}: set learner.layer_spec='te' (or fp8.enabled=false)")
    require_transformer_engine("fp8.enabled=True")
    fields = {"fp8": _FORMATS[fp8.recipe], "fp8_recipe": fp8.recipe}
    if fp8.recipe == "delayed":
        fields.update(_DELAYED)
    return fields


def require_transformer_engine(what: str) -> None:
    """Import Transformer Engine now (never at module import), raising a clear error naming `what`."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or OSError from a CUDA library that does not load
        raise RuntimeError(
            f"{what} needs Transformer Engine, which cannot be imported here ({type(err).__name__}: {err}). "
            f"Install it on a CUDA machine (pip install transformer-engine[pytorch], or use an NGC PyTorch "
            f"container), or turn the option off (fp8.enabled=false, learner.layer_spec='local')."
        ) from err

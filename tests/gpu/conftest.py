"""Skip logic of the GPU suite: every test here needs CUDA; tests marked `te` also need Transformer Engine,
tests marked `vllm_cuda` a CUDA build of vLLM.

The reason is printed with the skip (`-ra` is in pytest's addopts), so whoever runs the suite on a GPU node
sees at once whether CUDA or TE was missing. Transformer Engine is imported only when CUDA is present: on a CPU
machine its import is never attempted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "te: needs Transformer Engine (tests/gpu only)")
    config.addinivalue_line("markers", "vllm_cuda: needs a CUDA build of vLLM (tests/gpu only)")


def _transformer_engine_error() -> str | None:
    """Why Transformer Engine cannot be used here, or None when it can (the learner's own check)."""
    from megatron_s2l.learner.fp8 import require_transformer_engine

    try:
        require_transformer_engine("tests marked te")
    except RuntimeError as err:
        return str(err)
    return None


def _cuda_vllm_error() -> str | None:
    """Why a CUDA vLLM engine cannot be started here, or None when it can."""
    try:
        from vllm.platforms import current_platform
    except Exception as err:  # any import failure means the same thing here: no usable vLLM
        return f"needs vLLM, which cannot be imported here ({type(err).__name__}: {err})"
    if not current_platform.is_cuda():
        return f"needs a CUDA build of vLLM; the installed one targets {current_platform.device_type!r}"
    return None


def _skip_marked(items, marker: str, error: str | None) -> None:
    if error:
        skip = pytest.mark.skip(reason=f"{error} (tests/gpu/README.md: what to install on the GPU node)")
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(skip)


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if _HERE in Path(str(item.fspath)).parents]
    if not ours:
        return
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() "
                                       f"is False)")
        for item in ours:
            item.add_marker(skip)
        return
    for marker, error in (("te", _transformer_engine_error), ("vllm_cuda", _cuda_vllm_error)):
        if any(item.get_closest_marker(marker) for item in ours):
            _skip_marked(ours, marker, error())

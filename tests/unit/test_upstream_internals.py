"""Every upstream name the plugin relies on (the first table of patches/README.md) still exists, and the
table is complete: an upgrade that moves one fails here, with its name, rather than deep inside a run.

Completeness is read from the source: every name `megatron_s2l/` imports or reads from vLLM, every private
name of megatron-core or torch it reads, and every upstream attribute it assigns (a run-time patch) must be
in the table (a listed `a.b.c` also covers `a.b`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPSTREAMS = ("vllm", "megatron", "torch")
OWN_MARKERS = "_s2l"  # attributes the plugin sets on upstream classes to mark them patched


def listed_names() -> list[str]:
    """The dotted names of the table "Names imported or patched" in patches/README.md."""
    text = (ROOT / "patches" / "README.md").read_text(encoding="utf-8")
    table = text.split("## Names imported or patched")[1].split("\n## ")[0]
    return re.findall(r"^\| `([\w.]+)` \|", table, re.M)


def resolve(name: str):
    """The object `name` denotes: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for depth, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                pytest.fail(f"{name}: {'.'.join(parts[:depth])} has no attribute {attr!r} in this version")
            obj = getattr(obj, attr)
        return obj
    pytest.fail(f"{name}: no module of it can be imported")


@pytest.mark.parametrize("name", listed_names())
def test_listed_upstream_name_exists(name):
    if importlib.util.find_spec(name.split(".")[0]) is None:
        pytest.skip(f"{name.split('.')[0]} is not installed")
    resolve(name)


def test_refit_sets_the_storage_device_argument_of_rebuild_cuda_tensor():
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from megatron_s2l.rollout.refit import STORAGE_DEVICE_ARG

    assert list(inspect.signature(rebuild_cuda_tensor).parameters)[STORAGE_DEVICE_ARG] == "storage_device"


def _chain(node: ast.AST) -> list[str] | None:
    """["a", "b", "c"] for the expression a.b.c, None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else None


def upstream_touches(path: Path) -> set[str]:
    """The dotted upstream names `path` imports or reads from vLLM, reads when private, or assigns."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases, touches = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in UPSTREAMS:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in UPSTREAMS:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                aliases[a.asname or a.name] = full
                if node.module.startswith("vllm") or a.name.startswith("_"):
                    touches.add(full)
    assigned = {id(t) for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets}
    for node in ast.walk(tree):
        chain = _chain(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in aliases or chain[-1].startswith(OWN_MARKERS):
            continue
        full = ".".join([aliases[chain[0]], *chain[1:]])
        if id(node) in assigned or full.startswith("vllm") or any(part.startswith("_") for part in chain[1:]):
            touches.add(full)
    return touches


def test_every_upstream_touch_of_the_plugin_is_listed():
    listed = listed_names()
    missing = sorted(f"{name} ({path.relative_to(ROOT)})" for path in (ROOT / "megatron_s2l").rglob("*.py")
                     for name in upstream_touches(path)
                     if not any(entry == name or entry.startswith(name + ".") for entry in listed))
    assert not missing, f"add these to the first table of patches/README.md: {missing}"

"""The package's layers import only downward (CONTRIBUTING.md): a parse of every import keeps it so."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_s2l"

# What each layer may import from the package, besides itself.
ALLOWED = {
    "constants": set(),
    "config": {"constants"},
    "types": set(),
    "console": {"constants", "config"},
    "algo": {"constants", "types"},
    "learner": {"constants", "config", "types", "console", "algo"},
    "rollout": {"constants", "config", "types", "console", "algo"},
    "data": {"constants", "config", "types", "algo"},
    "evaluation": {"constants", "config", "types", "algo", "data", "rollout"},
    "loop": {"constants", "config", "types", "console", "algo", "learner", "rollout", "data", "evaluation"},
    "demo": {"constants", "config", "types", "console", "algo", "learner", "rollout", "data", "evaluation", "loop"},
    "launch": {"constants", "config", "console"},
}
THIRD_PARTY_FORBIDDEN = {"algo": {"megatron", "vllm", "transformers"}, "learner": {"vllm"},
                         "data": {"megatron", "vllm"}}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: use absolute imports (from megatron_s2l.x import y)")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path}: new top-level module {layer!r}: add it to ALLOWED with its layer"
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in THIRD_PARTY_FORBIDDEN.get(layer, ()), f"{path} ({layer}) must not import {name}"
        if top != "megatron_s2l" or name == "megatron_s2l":
            continue
        target = name.split(".")[1]
        if target == layer:
            continue
        allowed = ALLOWED[layer]
        assert target in allowed or ".".join(name.split(".")[1:3]) in allowed, (
            f"{path} ({layer}) imports {name}: {layer} may import only {sorted(allowed)}")


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    bad = PACKAGE / "algo" / "_layer_probe.py"
    probe = tmp_path / "probe.py"
    probe.write_text("from megatron_s2l.loop import train\n")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: probe.open().read())
    with pytest.raises(AssertionError, match="may import only"):
        test_imports_point_downward(bad)

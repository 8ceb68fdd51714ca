"""src/posttrain is layered: a module imports only from its own layer or the layers below it."""

import ast
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "posttrain"
# Bottom to top; realscale and experiments share a rank and may not import each other.
RANK = {
    "core": 0,
    "data": 1,
    "models": 2,
    "evaluate": 3,
    "train": 4,
    "report": 5,
    "realscale": 6,
    "experiments": 6,
}
TOP = "top level"  # posttrain/__init__.py, __main__.py, launch.py: above every layer
TOP_MODULES = {"__init__.py", "__main__.py", "launch.py"}


def _rank(layer: str) -> int:
    return len(RANK) if layer == TOP else RANK[layer]


def _layer(module: str) -> str:
    """The layer of a dotted module name under posttrain (the package itself and its flat modules: TOP)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else TOP


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The posttrain modules an import node names (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "posttrain"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target.split(".")[0] != "posttrain":
        return []
    if target == "posttrain":  # `from posttrain import data`: the layer (or flat module) named
        return [f"posttrain.{a.name}" for a in node.names]
    return [target]


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_import_points_up_the_layers():
    offending = []
    for path in _modules():
        module = _module(path)
        layer = _layer(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, module, path.name == "__init__.py"):
                other = _layer(target)
                if other == layer or _rank(other) < _rank(layer):
                    continue
                offending.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} ({layer}) imports {target} ({other}):"
                    f" {ast.unparse(node)}"
                )
    assert not offending, "imports pointing up the layers:\n" + "\n".join(offending)


def test_modules_live_in_layer_packages():
    flat = sorted(p.name for p in SRC.glob("*.py") if p.name not in TOP_MODULES)
    assert not flat, f"modules directly in src/posttrain (move each into its layer's folder): {flat}"
    folders = {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(RANK), f"unknown layer folders {sorted(folders - set(RANK))}"
    missing = sorted(name for name in RANK if not (SRC / name / "__init__.py").exists())
    assert not missing, f"layer folders without an __init__.py: {missing}"
    nested = sorted(str(p.relative_to(SRC)) for p in SRC.glob("*/*/*.py"))
    assert not nested, f"modules nested below a layer folder: {nested}"


def test_the_layer_check_sees_an_upward_import():
    """The check itself: a data module importing metrics (evaluate) is flagged, its own layer is not."""
    source = (
        "def f():\n    from posttrain.evaluate.metrics import YEAR\n    from posttrain.data import examples\n"
    )
    found = [
        (target, _layer(target))
        for node in ast.walk(ast.parse(source))
        for target in _imported(node, "posttrain.data.answers", False)
    ]
    assert found == [("posttrain.evaluate.metrics", "evaluate"), ("posttrain.data", "data")]
    assert _rank("evaluate") > _rank("data") and _layer("posttrain.launch") == TOP

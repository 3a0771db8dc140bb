"""The package's folders are its layers, and imports only run down them: the method knows no base model,
training or app; a base model's adapter knows the method but no training, evaluation or app; and so on
(docs/models.md, "Adding a base model"). Read from the source with ``ast``, every import, lazy ones too."""

from __future__ import annotations

import ast
from pathlib import Path

import fleximmt

PACKAGE = Path(fleximmt.__file__).parent
# each layer and the layers it may import (errors.py is shared by all)
ALLOWED = {
    "method": {"method"},
    "models": {"method", "models"},
    "training": {"method", "models", "training"},
    "evaluation": {"method", "models", "training", "evaluation"},
    "apps": {"method", "models", "training", "evaluation", "apps", "toy"},
    "toy": {"method", "models", "training", "evaluation", "apps", "toy"},
}


def imported_layers(path: Path) -> set[tuple[str, int]]:
    """(layer, line) of every fleximmt module ``path`` imports."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(module[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
                names = [name] if node.module else [f"{name}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fleximmt" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add((parts[1], node.lineno))
    return found


def imported_modules(path: Path) -> set[str]:
    """Every fleximmt module ``path`` imports (lazy ones too), by its dotted name."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(module[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            candidates = [name] + [f"{name}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if module_path(c) is not None}
    return found


def module_path(name: str) -> Path | None:
    """The file of fleximmt module ``name`` (a package's ``__init__.py``), or None."""
    parts = name.split(".")
    if parts[0] != "fleximmt":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_the_method_layer_imports_without_a_cycle():
    """Inside ``method/`` imports run one way (no two modules import each other, however indirectly, lazy
    imports included): each module can be read, and changed, knowing only what it imports."""
    graph = {}
    for path in sorted((PACKAGE / "method").rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in imported_modules(path) if m.startswith("fleximmt.method")} - {name}
    cycles = []

    def visit(name, trail):
        if name in trail:
            cycles.append(" -> ".join([*trail[trail.index(name) :], name]))
            return
        for target in sorted(graph.get(name, ())):
            if target not in done:
                visit(target, [*trail, name])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [])
    assert "fleximmt.method.attention" in graph["fleximmt.method.pipeline"]  # the graph sees imports
    assert cycles == []


def test_every_module_sits_in_a_layer():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "errors"))
    assert loose == [], f"modules outside the layer folders: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == set(ALLOWED)


def test_imports_run_down_the_layers():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for target, line in sorted(imported_layers(path)):
                if target not in allowed:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports fleximmt.{target}")
    assert wrong == []


def test_the_check_sees_a_wrong_arrow(tmp_path):
    """The checker itself: a method module importing a base model is found (lazy import included)."""
    bad = PACKAGE / "method" / "_layer_probe.py"
    bad.write_text("def f():\n    from ..models import adapter_for\n")
    try:
        assert imported_layers(bad) == {("models", 2)}
    finally:
        bad.unlink()


def test_public_imports_unchanged():
    from fleximmt import (
        FlexiMMTInputError,
        FlexiMMTPipeline,
        FlexiMMTPipelineOutput,
        FlexiMMTWanPipeline,
        MotionTokens,
        ObjectMotion,
        TrainSettings,
        compile,
        load_pipeline,
        train_motion,
    )

    assert all(
        callable(x)
        for x in (
            FlexiMMTPipeline,
            FlexiMMTWanPipeline,
            MotionTokens,
            ObjectMotion,
            TrainSettings,
            compile,
            load_pipeline,
            train_motion,
        )
    )
    assert issubclass(FlexiMMTInputError, ValueError) and FlexiMMTPipelineOutput.__name__ == "FlexiMMTPipelineOutput"

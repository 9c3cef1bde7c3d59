"""The package's shape, checked from its source: no import cycle (function-level imports count:
a lazy import only hides a cycle), the core imports no engine or recipe, and no engine adapter
reaches for a core name that starts with an underscore."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "moga_dist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import statement anywhere in the file, made absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names in _imports(path):
            # `from pkg import sub` imports the submodule pkg.sub when it is one.
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if not hits and target in modules:
                hits = [target]
            graph[mod].update(h for h in hits if h != mod)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph_without_package_inits(graph):
    # A package __init__ re-exporting its children is not a cycle of logic: drop edges into
    # package __init__ modules from their own descendants.
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycle():
    cycle = _cycle(_graph_without_package_inits(_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_imports_no_engine_or_recipe():
    for path in (ROOT / "core").rglob("*.py"):
        for target, _ in _imports(path):
            for banned in ("moga_dist.engines", "moga_dist.train", "moga_dist.bench", "moga_dist.sweep",
                           "deepspeed", "megatron", "accelerate", "transformers", "lightning", "torchtitan"):
                assert not (target == banned or target.startswith(banned + ".")), f"{path.name} imports {target}"


def test_engines_use_no_private_core_name():
    for path in (ROOT / "engines").rglob("*.py"):
        core_aliases = set()
        for target, names in _imports(path):
            if target == "moga_dist.core" or target.startswith("moga_dist.core."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports private core names {private}"
                core_aliases.update(names)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in core_aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                raise AssertionError(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")

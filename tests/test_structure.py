"""The package's shape, checked from its source: no import cycle (function-level imports count:
a lazy import only hides a cycle), the core imports no engine or recipe, no engine adapter reaches
for a core name that starts with an underscore; docs/architecture.md names every module, the docs
name only files that exist, and every test module has one kind (tests/conftest.py KINDS)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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


REPO = ROOT.parent
# Top-level folders of the repository: a backticked path in the docs that starts with one of them
# names a file that must exist (a placeholder such as OUT/results.jsonl starts with none).
_REPO_DIRS = ("moga_dist/", "docs/", "tests/", "configs/", "launch/", "docker/", ".ci/")


def _module_table(text: str) -> list[tuple[list[str], str]]:
    """docs/architecture.md's module table: (paths named in the first cell, the rest of the row).
    A cell names its first path in full and may add bare file names in the same folder."""
    rows = []
    start = text.index("| path | what it holds |")
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        first, rest = line.strip("|").split("|", 1)
        names = re.findall(r"`([^`]+)`", first)
        folder = names[0].rsplit("/", 1)[0] if names else ""
        rows.append(([names[0]] + [f"{folder}/{n}" for n in names[1:]] if names else [], rest))
    return rows


def test_every_module_is_in_the_architecture_table():
    """Each moga_dist/**/*.py is a row (or a name in one) of docs/architecture.md's module table,
    with something said about it, and the table names no module that is gone."""
    rows = _module_table((REPO / "docs" / "architecture.md").read_text())
    listed = {p for paths, rest in rows for p in paths if rest.strip()}
    modules = {str(p.relative_to(REPO)) for p in ROOT.rglob("*.py")}
    assert not modules - listed, f"modules missing from docs/architecture.md's table: {sorted(modules - listed)}"
    gone = {p for p in listed if not (REPO / p).exists()}
    assert not gone, f"docs/architecture.md's table names files that do not exist: {sorted(gone)}"


def test_module_table_check_can_fail():
    rows = _module_table("| path | what it holds |\n|---|---|\n| `moga_dist/core/a.py`, `b.py` | x |\n\nmore")
    assert rows == [(["moga_dist/core/a.py", "moga_dist/core/b.py"], " x ")]


def _broken_references(md: Path) -> list[str]:
    """Markdown links (relative to the file) and backticked repository paths (relative to the
    repository root) in `md` that name nothing."""
    text, broken = md.read_text(), []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                            # a web address or an anchor in the same page
        if not (md.parent / target.split("#")[0]).exists():
            broken.append(target)
    for target in re.findall(r"`([A-Za-z0-9_./-]+)`", text):
        if target.startswith(_REPO_DIRS) and "*" not in target and not (REPO / target).exists():
            broken.append(target)
    return broken


def test_docs_reference_only_files_that_exist():
    broken = {str(md.relative_to(REPO)): b for md in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
              if (b := _broken_references(md))}
    assert not broken, f"links or paths to files not in the repository: {broken}"


def test_reference_check_can_fail(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("[a](nowhere.md) [b](https://example.org) [c](#top) `moga_dist/no_such.py` `moga_dist/testing.py`")
    assert _broken_references(md) == ["nowhere.md", "moga_dist/no_such.py"]


def test_every_test_module_has_exactly_one_kind():
    """tests/conftest.py KINDS (unit / distributed / engines / job) names every tests/test_*.py
    once and nothing else: a new module cannot be left without a marker."""
    import conftest

    listed = [m for modules in conftest.KINDS.values() for m in modules]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"in more than one kind of tests/conftest.py KINDS: {twice}"
    present = {p.stem for p in (REPO / "tests").glob("test_*.py")}
    assert not present - set(listed), f"test modules without a kind in tests/conftest.py KINDS: {sorted(present - set(listed))}"
    assert not set(listed) - present, f"tests/conftest.py KINDS names modules that are gone: {sorted(set(listed) - present)}"


def test_no_reference_to_a_spec_the_repository_does_not_hold():
    """The design notes' spec (moga_spec.md) is not in the repository: code and docs point to docs/
    or README.md instead, so a reader can follow every reference."""
    files = [*ROOT.rglob("*.py"), *(REPO / "docs").glob("*.md"), REPO / "README.md", *(REPO / "tests").glob("*.py")]
    pattern = re.compile(r"moga_spec|spec §|§\s*\d")
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files if p.name != "test_structure.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"references to a spec not in the repository: {hits}"


def test_testing_doc_names_every_test_module():
    """docs/testing.md says what each tests/test_*.py proves: a new module gets a row."""
    text = (REPO / "docs" / "testing.md").read_text()
    missing = sorted(p.name for p in (REPO / "tests").glob("test_*.py") if f"`{p.name}`" not in text)
    assert not missing, f"test modules docs/testing.md does not describe: {missing}"


def _hand_set_kinds(source: str) -> set[str]:
    return set(re.findall(r"pytest\.mark\.(unit|distributed|engines|job)\b", source))


def test_no_hand_set_kind_marker_disagrees_with_the_table():
    """A kind is the module's (tests/conftest.py KINDS); a marker written by hand may only repeat it."""
    import conftest

    wrong = {p.name: sorted(k - {conftest.KIND_OF.get(p.stem)})
             for p in sorted((REPO / "tests").glob("test_*.py")) if (k := _hand_set_kinds(p.read_text()))
             and k - {conftest.KIND_OF.get(p.stem)}}
    assert not wrong, f"hand-set kind markers that disagree with tests/conftest.py KINDS (remove them): {wrong}"


def test_hand_set_kind_check_can_fail():
    mark = "@pytest.mark."          # split, so this file does not carry the marker it tests for
    assert _hand_set_kinds(f"{mark}distributed\ndef test_x(): pass\n{mark}slow") == {"distributed"}


def _core_private_names() -> set[str]:
    """Underscore names the core defines: its private functions and classes, and the private
    attributes its objects set on themselves (MOGA's `_programs`, `_suspended`, ...)."""
    names = set()
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


# MOGA attributes that are the core's own bookkeeping: an engine goes through the public
# accessors (process_group, layout_of, options_of, declare*) instead.
_CORE_INTERNALS = ("reducer", "tensors")


def _engine_reads_of_core_internals(sources: dict[str, str]) -> list[str]:
    private = _core_private_names()
    found = []
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and (node.attr in private or node.attr in _CORE_INTERNALS):
                found.append(f"{name}:{node.lineno} .{node.attr}")
    return found


def test_engines_read_no_core_internals():
    """No engine adapter (nor the DTensor reader) reaches into MOGA's private attributes or its
    registries (`optimizer.reducer.process_groups` was read by core/dtensor.py)."""
    sources = {p.name: p.read_text() for p in (ROOT / "engines").rglob("*.py")}
    assert _engine_reads_of_core_internals(sources) == []
    # core/dtensor.py is core (it maintains the tensor registry) but asks for groups publicly
    dtensor = _engine_reads_of_core_internals({"core/dtensor.py": (ROOT / "core" / "dtensor.py").read_text()})
    assert [r for r in dtensor if r.endswith(".reducer")] == []
    # the check can fail: the old reads it replaces
    assert _engine_reads_of_core_internals({"old.py": "x = optimizer.reducer.process_groups\n"
                                                      "moga._programs.clear()\n"}) == ["old.py:1 .reducer",
                                                                                        "old.py:2 ._programs"]


_PLACEHOLDER = re.compile(r"Parameter\(\s*torch\.(zeros|ones|empty|randn|rand)\(\s*\(?\s*1\s*,?\s*\)?\s*\)")


def test_no_placeholder_parameter():
    """Engines build MOGA with MOGA.from_engine, not around a dummy nn.Parameter(torch.zeros(1))
    swapped out afterwards."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in ROOT.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if _PLACEHOLDER.search(line)]
    assert hits == []
    assert _PLACEHOLDER.search("MOGA([torch.nn.Parameter(torch.zeros(1))], **settings)")
    assert _PLACEHOLDER.search("nn.Parameter(torch.empty((1,)))")


def test_import_moga_dist_leaves_deepspeed_and_meta_path_alone():
    """`import moga_dist` installs no import hook and patches no DeepSpeed; constructing a MOGA (or
    importing moga_dist.engines.deepspeed) is what installs the DeepSpeed patch."""
    code = (
        "import sys\n"
        "before = list(sys.meta_path)\n"
        "import moga_dist, torch\n"
        "assert sys.meta_path == before, sys.meta_path\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'deepspeed'], 'deepspeed imported'\n"
        "moga_dist.MOGA([torch.nn.Parameter(torch.zeros(2, 2))])\n"
        "assert any(type(f).__name__ == '_PatchWhenImported' for f in sys.meta_path), sys.meta_path\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT.parent,
                         env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

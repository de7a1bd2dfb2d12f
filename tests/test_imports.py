"""The import rules of README "Layout", checked on the import graph read from the source with `ast`.

Every import counts: top level, inside functions and under `if TYPE_CHECKING:` alike, since each is a dependency a
reader has to follow. Rules: `models` imports neither `parallel` nor `trainer`; `kernels` imports nothing of ours;
`parallel` does not import `trainer`; no import cycle among the modules of a package, nor among the subpackages and
modules directly inside `trainer/`. And every import of ours, in the code, the tests and bench/, goes through the
`normtron` namespace: a bare `import models` would work nowhere but in a checkout, and shadow others' packages.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from helpers import REPO

PACKAGES = ("kernels", "models", "parallel", "trainer")
FORBIDDEN = {"kernels": ("models", "parallel", "trainer"), "models": ("parallel", "trainer"), "parallel": ("trainer",)}


def module_name(path: Path) -> str:
    """The import name of a file: models/transformer.py is normtron.models.transformer (pyproject's package-dir)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(("normtron", *(parts[:-1] if parts[-1] == "__init__" else parts)))


@cache
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: line of the first such import}."""
    paths = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join([*anchor, *([base] if base else [])])
                # `from package import module` imports the module; `from module import name` the module itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in paths:  # `import a.b.c` of a non-module attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _top(module: str) -> str:
    """The layer of normtron.<layer>.x."""
    return module.split(".")[1]


def test_the_graph_sees_known_imports():
    """The reader finds imports of every form the project uses (so that an empty result means no violation)."""
    graph = import_graph()
    assert "normtron.models.norms" in graph["normtron.models.transformer"]  # from normtron.models.norms import ...
    assert "normtron.trainer.convert.hf.mapping" in graph["normtron.trainer.convert.to_hf"]  # from pkg import module
    assert "normtron.parallel.zero" in graph["normtron.trainer.convert.consolidate"]  # an import inside a function
    assert "normtron.trainer.plan" in graph["normtron.trainer.cli"]  # from a package's __init__


def test_layers_import_only_downwards():
    """models <- parallel <- trainer, with kernels below all of them."""
    violations = [f"{module} imports {target} (line {line})"
                  for module, edges in import_graph().items() for target, line in edges.items()
                  if _top(target) in FORBIDDEN.get(_top(module), ())]
    assert not violations, "imports against the layer rules (README, Layout):\n" + "\n".join(violations)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one node (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_cycles_between_modules():
    graph = {module: set(edges) for module, edges in import_graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles (break each by moving the shared concept down):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_cycles_between_the_parts_of_trainer():
    """trainer/'s subpackages (convert/, data/, study/) and its modules, each taken as one node."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:3])

    graph: dict[str, set[str]] = {}
    for module, edges in import_graph().items():
        if _top(module) == "trainer":
            graph.setdefault(part(module), set()).update(
                part(t) for t in edges if _top(t) == "trainer" and part(t) != part(module))
    cycles = _cycles(graph)
    assert not cycles, "import cycles between the parts of trainer/:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _python_files() -> list[Path]:
    return [p for folder in (*PACKAGES, "normtron", "tests", "bench") for p in sorted((REPO / folder).rglob("*.py"))]


def test_every_import_of_ours_names_the_namespace():
    """No `import models` / `from trainer.x import y` anywhere: only `normtron.models`, `normtron.trainer.x`."""
    bare = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            bare += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                     if name.split(".")[0] in PACKAGES]
    assert not bare, "imports without the normtron namespace:\n" + "\n".join(bare)


def test_the_layer_folders_are_not_packages_of_their_own():
    """models/, kernels/, parallel/, trainer/ (and configs/, launch/) hold no __init__.py: a Python started in the
    repository root then finds another distribution's `kernels` (Hugging Face's) before our folder."""
    assert not [f for f in (*PACKAGES, "configs", "launch") if (REPO / f / "__init__.py").exists()]


def test_no_script_folder_holds_a_module_named_like_a_package():
    """`python bench/x.py` puts bench/ first on sys.path: a bench/kernels.py there would be the `kernels` that
    transformers imports (so would tests/kernels.py under pytest)."""
    clashes = [str(p.relative_to(REPO)) for folder in ("bench", "tests", "launch") for p in (REPO / folder).glob("*")
               if p.stem in (*PACKAGES, "normtron", "transformers", "torch")]
    assert not clashes, clashes

"""The package's import graph: no module imports from a layer above its own, and no import
cycles, counting imports inside functions (they run too, only later). Read from the source
with `ast`, so the test needs nothing but the files."""

from __future__ import annotations

import ast
from pathlib import Path

import peftseg

PACKAGE = Path(peftseg.__file__).resolve().parent

# lowest first; a module may import its own layer and the layers below it
LAYERS = (
    ("peftseg", "peftseg.errors", "peftseg.checks", "peftseg.io", "peftseg.environment"),
    ("peftseg.registry", "peftseg.search_space", "peftseg.results"),
    ("peftseg.config",),
    ("peftseg.models", "peftseg.data", "peftseg.methods", "peftseg.params"),
    ("peftseg.engine", "peftseg.checkpoint", "peftseg.report"),
    ("peftseg.cli",),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best, found = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """peftseg modules `name` imports, at any depth of its code."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("peftseg")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("peftseg"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)  # `from peftseg import checks` is the module
    return {m for m in out if m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                    for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_the_graph_sees_function_local_imports():
    # the checker itself: a cycle hidden in a function body would otherwise pass unseen
    g = graph()
    assert "peftseg.checkpoint.load" in g["peftseg.cli.eval"]  # imported inside main()
    assert layer_of("peftseg.cli.train") > layer_of("peftseg.engine.run") > layer_of("peftseg.models.vitdet")


def test_families_leave_detectron2s_global_registry_to_the_official_packages():
    """The official MaskDINO package registers `MaskDINO` in META_ARCH_REGISTRY; importing
    ours beside it (to compare outputs) must not fail with "already registered"."""
    import importlib

    from detectron2.modeling import META_ARCH_REGISTRY

    before = set(dict(META_ARCH_REGISTRY))
    for module in ("peftseg.models._maskdino.meta_arch", "peftseg.models._mask2former", "peftseg.models._seem.meta_arch"):
        importlib.import_module(module)
    assert set(dict(META_ARCH_REGISTRY)) == before
    if "MaskDINO" not in before:  # what `import maskdino` (the official package) does
        class MaskDINO:  # noqa: D401 - a stand-in with the official name
            pass

        META_ARCH_REGISTRY.register(MaskDINO)
        try:
            from peftseg.models._maskdino.meta_arch import MaskDINO as Ours  # still importable, still ours
            assert Ours.__module__ == "peftseg.models._maskdino.meta_arch"
        finally:
            META_ARCH_REGISTRY._obj_map.pop("MaskDINO")

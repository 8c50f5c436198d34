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
    ("peftseg", "peftseg.errors", "peftseg.checks", "peftseg.io", "peftseg.environment", "peftseg.compat"),
    ("peftseg.registry", "peftseg.search_space", "peftseg.results"),
    ("peftseg.config",),
    ("peftseg.models", "peftseg.data", "peftseg.methods", "peftseg.params"),
    ("peftseg.build",),
    ("peftseg.checkpoint", "peftseg.report"),
    ("peftseg.engine",),
    ("peftseg.experiments",),
    ("peftseg.cli",),
)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
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


def cycles_of(g: dict[str, set[str]]) -> list[str]:
    """Every import cycle of graph `g` (node -> the nodes it imports), as `a -> b -> a`."""
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
    return cycles


def package_of(module: str) -> str:
    """The package a module belongs to: `peftseg.engine.run` -> `peftseg.engine`; a module
    directly under peftseg (config, results, …) is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between packages: engine -> checkpoint when any module of one imports any of the other."""
    out: dict[str, set[str]] = {}
    for module, deps in g.items():
        out.setdefault(package_of(module), set()).update(
            package_of(d) for d in deps if package_of(d) != package_of(module))
    return out


def test_no_import_cycles():
    cycles = cycles_of(graph())
    assert not cycles, "\n".join(cycles)


def test_no_import_cycles_between_packages():
    # a loop through two packages can hide from the module graph: a.x -> b.y and b.z -> a.w
    cycles = cycles_of(package_graph(graph()))
    assert not cycles, "\n".join(cycles)


def test_a_loop_between_packages_is_refused(tmp_path):
    """The checker itself, on a package built to hold a loop: checkpoint.load imports
    engine.run (to rebuild a model) while engine.trainer imports checkpoint.files. No module
    cycle, one package cycle; and engine sits above checkpoint, so the upward import shows."""
    root = tmp_path / "peftseg"
    for name, body in {"__init__.py": "", "engine/__init__.py": "", "checkpoint/__init__.py": "",
                       "engine/run.py": "", "engine/trainer.py": "from peftseg.checkpoint.files import FINAL\n",
                       "checkpoint/files.py": "FINAL = 'model_final'\n",
                       "checkpoint/load.py": "def load():\n    from peftseg.engine.run import run\n"}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    found = {module_name(p, root): p for p in root.rglob("*.py")}
    g = {n: imports_of(n, p, set(found)) for n, p in found.items()}
    assert not cycles_of(g)  # no module imports itself back
    assert cycles_of(package_graph(g)) == ["peftseg.checkpoint -> peftseg.engine -> peftseg.checkpoint"]
    assert layer_of("peftseg.checkpoint.load") < layer_of("peftseg.engine.run")  # and it imports upward


def test_the_graph_sees_function_local_imports():
    # the checker itself: a cycle hidden in a function body would otherwise pass unseen
    g = graph()
    assert "peftseg.checkpoint.load" in g["peftseg.cli.eval"]  # imported inside main()
    assert layer_of("peftseg.cli.train") > layer_of("peftseg.engine.run") > layer_of("peftseg.models.vitdet")
    assert layer_of("peftseg.experiments.search") > layer_of("peftseg.engine.run") > layer_of("peftseg.checkpoint.load")
    assert layer_of("peftseg.checkpoint.load") > layer_of("peftseg.build") > layer_of("peftseg.methods.lora")


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

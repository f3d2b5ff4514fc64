"""The import rules of DESIGN.md, read from the source with ast (imports inside functions count too):
triton_kernels <- ops <- (patching, lora, quant) <- (training, api) <- recipe <- cli, nothing imports
upward, and no module imports itself back through others."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"fusetune": ROOT / "python" / "fusetune", "fusetune.triton_kernels": ROOT / "triton_kernels"}
# each part of fusetune (a subpackage or a top-level module) and its layer: imports go to the same layer or below
LAYERS = {"triton_kernels": 0, "reference": 0, "atomic": 0, "data": 0, "_C": 0, "version": 0, "backend": 1, "ops": 2,
          "patching": 3, "lora": 3, "quant": 3, "training": 4, "api": 4, "recipe": 5, "cli": 6}
EXTENSIONS = {"fusetune._C"}  # compiled from csrc/: modules without a .py file


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module of fusetune (a package by its __init__.py)."""
    found = {}
    for package, folder in SOURCES.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = file
    return found


def _resolve(dotted: str, known) -> str:
    """The module `dotted` names (for `from X import name`: X.name where that is a module, else X)."""
    while dotted not in known and "." in dotted and dotted.rsplit(".", 1)[0] in known:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


def _imports(name: str, file: Path, known) -> set[str]:
    """The fusetune modules that module `name` imports."""
    package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: x inside the package `level - 1` steps above this one's
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.update(_resolve(f"{base}.{alias.name}", known) for alias in node.names)
    return {t for t in targets if t.split(".")[0] == "fusetune"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | EXTENSIONS
    return {name: _imports(name, file, known) for name, file in modules.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "the fusetune package itself"


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules() if m != "fusetune"}
    assert parts <= set(LAYERS), f"place {sorted(parts - set(LAYERS))} in LAYERS (and in DESIGN.md's order)"


def test_nothing_imports_upward():
    upward = []
    for module, targets in _graph().items():
        if module == "fusetune":
            continue  # the package's facade re-exports from every layer
        for target in targets:
            if _part(target) not in LAYERS or LAYERS[_part(target)] > LAYERS[_part(module)]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against DESIGN.md's order:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)

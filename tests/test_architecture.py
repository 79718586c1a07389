"""The house rules of the package layout (docs/architecture.md), read from the source.

- Public modules (`bnjax`, `bnjax.linen`, ...) are faces: a docstring, `X as X`
  re-exports from private modules and `__all__`, nothing else.
- Implementations live in private subpackages (`bnjax/_core`, `bnjax/_flax`, ...); each
  may import only the layers below it (the core imports no tool).
- No import circles between modules, counting imports inside functions.
- No underscore-prefixed name crosses a file: not imported (`from m import _x`) and not
  read from an imported module (`m._x`).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "bnjax"
FACES = ("__init__", "linen", "nnx", "training", "deploy", "interop", "flax_interop", "testing")
# What each private subpackage may import (besides itself): the layers below it.
ALLOWED = {
    "_core": set(),
    "_flax": {"_core"},
    "_model": {"_core", "_flax"},
    "_training": {"_core", "_flax", "_model"},
    "_checkpoint": {"_core"},
    "_deploy": {"_core", "_flax", "_model"},
    "_interop": {"_core", "_flax", "_model"},
    "_testing": {"_core", "_flax", "_model", "_interop"},
}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = modules()


def bnjax_imports(name: str, tree: ast.Module) -> list[tuple[str, str, int]]:
    """`(module imported, name imported or "", line)` for every bnjax import, nested ones too."""
    pkg = name if name.endswith(tuple(f".{p}" for p in ALLOWED)) else name.rsplit(".", 1)[0]
    del pkg
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("bnjax")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                target = sub if sub in MODULES else node.module
                found.append((target, "" if target == sub else a.name, node.lineno))
    return found


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ALLOWED else None


def test_every_private_module_is_in_a_known_subpackage():
    loose = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in (*FACES, *ALLOWED)]
    assert not loose, f"modules outside the layout of docs/architecture.md: {loose}"


@pytest.mark.parametrize("face", FACES)
def test_public_modules_only_re_export(face):
    name = "bnjax" if face == "__init__" else f"bnjax.{face}"
    tree = MODULES[name]
    body = list(tree.body)
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    bad = []
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax._"):
            # `__getattr__`: the face's deprecated names (bnjax._core.deprecation).
            bad += [a.name for a in node.names if a.asname not in (a.name, "__getattr__")]
        elif isinstance(node, ast.ImportFrom) and node.module == "importlib.metadata":
            continue  # bnjax.__version__
        elif isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]:
            continue
        elif isinstance(node, ast.Try) and face == "__init__":
            continue  # __version__ = version("bnjax")
        else:
            bad.append(ast.dump(node)[:80])
    assert not bad, f"{name} must only re-export (`from bnjax._x.y import Name as Name`): {bad}"


def test_each_layer_imports_only_the_layers_below():
    bad = []
    for name, tree in MODULES.items():
        own = layer(name)
        if own is None:
            continue
        for target, _, line in bnjax_imports(name, tree):
            other = layer(target)
            if other is None:
                bad.append(f"{name}:{line} imports the public face {target}")
            elif other != own and other not in ALLOWED[own]:
                bad.append(f"{name}:{line} imports {target} ({own} may use {sorted(ALLOWED[own])})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = {name: set() for name in MODULES}
    for name, tree in MODULES.items():
        for target, _, _ in bnjax_imports(name, tree):
            if target in MODULES and target != name and not name.startswith(target + "."):
                if target.count(".") == 1 and target.split(".")[1] in ALLOWED:
                    continue  # a subpackage's empty __init__
                graph[name].add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_file():
    bad = []
    for name, tree in MODULES.items():
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases.add(a.asname or a.name)  # a module
                    elif a.name.startswith("_"):
                        bad.append(f"{name}:{node.lineno} imports {node.module}.{a.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, "private names used across files:\n" + "\n".join(bad)

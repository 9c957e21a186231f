"""subseg's layers: a module imports only from its own subpackage or lower ones, and no cycles.

The order is ``subseg.LAYERS`` (read from ``subseg/__init__.py``, without importing it). Every
import counts: module-level, inside functions and under ``if TYPE_CHECKING``, absolute
(``import subseg.x.y``, ``from subseg.x import y``, ``from subseg.x.y import z``) and relative.
"""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "subseg"


def _layers() -> tuple[str, ...]:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == "LAYERS" for t in targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("subseg/__init__.py defines no LAYERS")


LAYERS = _layers()
ORDER = " < ".join(LAYERS)


def _modules() -> dict[str, Path]:
    """Dotted name → file of every module and package of subseg."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _where(path: Path, line: int | None = None) -> str:
    name = str(path.relative_to(REPO))
    return name if line is None else f"{name}:{line}"


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported subseg module) of every import in a module's source, wherever it is.

    ``from A import b`` names the module ``A.b`` when there is one, else ``A`` (b is a name in it).
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "subseg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "subseg":
                continue
            for alias in node.names:
                named = f"{base}.{alias.name}"
                out.append((node.lineno, named if named in MODULES else base))
    return sorted(out)


def imports_of(module: str) -> list[tuple[int, str]]:
    """:func:`imports_in` of one of subseg's modules."""
    path = MODULES[module]
    return imports_in(path.read_text(), module, path.name == "__init__.py")


def layer_of(module: str) -> str:
    """The subpackage a module belongs to; ``subseg/__init__.py`` is imported by every module,
    so it counts as the lowest layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else LAYERS[0]


def _edges() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every import between subseg's modules."""
    return [
        (module, imported, line)
        for module in MODULES
        for line, imported in imports_of(module)
        if imported != module
    ]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_every_module_lives_in_a_layer():
    top_level = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert not top_level, (
        f"modules at the top level of subseg/: {', '.join(top_level)}; move each into the "
        f"subpackage of its layer ({ORDER})"
    )
    folders = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/**/*.py")}
    assert folders <= set(LAYERS), (
        f"subseg/{', subseg/'.join(sorted(folders - set(LAYERS)))}: not in subseg.LAYERS ({ORDER})"
    )
    missing = [layer for layer in LAYERS if not (PACKAGE / layer / "__init__.py").is_file()]
    assert not missing, f"layers without an __init__.py: {missing}"


def test_no_module_imports_from_a_higher_layer():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [
        f"{_where(MODULES[module], line)}: imports {imported}, but {layer_of(imported)} is above "
        f"{layer_of(module)}"
        for module, imported, line in _edges()
        if rank.get(layer_of(imported), -1) > rank[layer_of(module)]  # -1: no such subpackage
    ]
    assert not upward, f"imports from a higher layer ({ORDER}):\n" + "\n".join(upward)


def _assert_acyclic(node_of, what: str) -> None:
    """Fail with one cycle of the graph whose nodes are ``node_of(module)`` (None: left out),
    each edge of it shown by the first import that makes it."""
    graph: dict[str, set[str]] = {}
    witness: dict[tuple[str, str], str] = {}
    for module, imported, line in _edges():
        a, b = node_of(module), node_of(imported)
        if a is not None and b is not None and a != b:
            graph.setdefault(a, set()).add(b)
            witness.setdefault((a, b), f"{_where(MODULES[module], line)}: imports {imported}")
    cycle = _cycle(graph)
    assert cycle is None, (
        f"{what} import each other in a cycle: "
        + " -> ".join(cycle)
        + "\n"
        + "\n".join(witness[pair] for pair in zip(cycle, cycle[1:], strict=False))
    )


def test_no_cycle_between_subpackages():
    _assert_acyclic(layer_of, "subpackages")


def test_no_import_cycle_between_modules():
    """Importing each module alone cannot show a cycle that a function-level import closes."""
    _assert_acyclic(lambda m: m if m in MODULES and m != "subseg" else None, "modules")


def test_the_parser_sees_every_kind_of_import():
    source = (
        "import subseg.core.io\n"
        "from subseg.core import labels\n"
        "from subseg.model.network import SubcorticalNet\n"
        "from . import transforms\n"
        "from ..core.cache import file_digest\n"
        "from subseg import LAYERS\n"
        "def f():\n"
        "    from subseg.tasks import predict\n"
    )
    assert imports_in(source, "subseg.preprocessing.probe") == [
        (1, "subseg.core.io"),
        (2, "subseg.core.labels"),
        (3, "subseg.model.network"),
        (4, "subseg.preprocessing.transforms"),
        (5, "subseg.core.cache"),
        (6, "subseg"),
        (8, "subseg.tasks.predict"),
    ]

"""The import rules of the code base, checked by parsing every module's imports with ``ast``.

docs/architecture.md draws the layout; these tests keep it true. Every import counts, also
the ones under ``if TYPE_CHECKING:`` and inside functions: a circle hidden that way is still
a circle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("hotpath", "proxy", "router", "ops", "metrics")
# The CLI and the admin HTTP layer import lazily on purpose: `pgsplit status` must not pay
# for asyncpg and aiohttp's start-up, nor the proxy for the demo's sandbox.
LAZY_IMPORTS_ALLOWED = ("proxy.cli", "proxy.admin")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for top in PRODUCT for p in (ROOT / top).rglob("*.py")}


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.append((base, child.lineno, in_function))
                # `from proxy import wire` imports the submodule proxy.wire
                found.extend((f"{base}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {
        name: {imported for imported, _, _ in imports_of(name, path) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return found


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(importer: str, forbidden: tuple[str, ...]) -> list[str]:
    modules = product_modules()
    return [
        f"{name}:{line} imports {imported}"
        for name, path in modules.items() if _under(name, importer)
        for imported, line, _ in imports_of(name, path) if _under(imported, *forbidden)
    ]


def test_no_circles():
    assert circles(graph()) == []


@pytest.mark.parametrize("importer, forbidden", [
    ("hotpath", ("proxy", "router", "ops", "metrics", "loadtest")),  # decides before any of them loads
    ("router", ("proxy", "ops", "loadtest")),  # the decisions and the model stand alone
    ("ops", ("proxy", "loadtest")),  # cluster operations work without a data plane
    ("metrics", ("proxy", "router", "ops", "loadtest")),
    ("proxy.server", ("proxy.session", "proxy.process", "proxy.admin")),  # a server connection knows no client
    ("proxy.session", ("proxy.process", "proxy.admin", "proxy.app")),  # a session sees the process through SessionHost
    ("proxy.listener", ("proxy.admin", "proxy.app")),  # the console is reached through the host
    # the console's rows come from plain data: no socket, session or wire in them
    ("proxy.admin.show", ("proxy.session", "proxy.server", "proxy.process", "proxy.app", "proxy.wire")),
])
def test_dependencies_point_one_way(importer, forbidden):
    assert violations(importer, forbidden) == []


@pytest.mark.parametrize("library, allowed", [
    ("uvloop", ("proxy.loop",)),  # the event loop is chosen in one place (PGSPLIT_LOOP)
    ("prometheus_client", ("metrics",)),  # the hot path counts in plain ints; metrics exports them
    ("loadtest", ("proxy.cli",)),  # the demo lives in loadtest; only the CLI reaches it
])
def test_libraries_have_one_door(library, allowed):
    modules = product_modules()
    offenders = [
        f"{name}:{line}"
        for name, path in modules.items() if not _under(name, *allowed)
        for imported, line, _ in imports_of(name, path) if _under(imported, library)
    ]
    assert offenders == []


def test_no_imports_inside_functions():
    modules = product_modules()
    offenders = [
        f"{name}:{line} imports {imported}"
        for name, path in modules.items() if not _under(name, *LAZY_IMPORTS_ALLOWED)
        for imported, line, inside in imports_of(name, path) if inside
    ]
    assert offenders == []


def test_the_checker_sees_a_circle():
    """The rules are only as good as the graph: a known circle must be found."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []

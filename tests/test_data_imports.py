"""The data package's modules depend on each other one way: no import cycle, deferred imports included."""

import ast
from pathlib import Path

import bitnet_jax.data

DATA = Path(bitnet_jax.data.__file__).parent
PACKAGE = "bitnet_jax.data"


def _imports(path: Path) -> set[str]:
    """The data modules ``path`` imports, at module level or inside functions ("__init__" for the
    package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            sub = node.module[len(PACKAGE) + 1:]
            if sub:
                found.add(sub.split(".")[0])
            else:  # from bitnet_jax.data import x: a module of the package, or a name of __init__
                found |= {a.name if (DATA / f"{a.name}.py").is_file() else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len(PACKAGE) + 1:].split(".")[0] or "__init__"
                      for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path [a, b, ..., a], or [] when it has none."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_cycle_finder_reports_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_data_modules_import_each_other_without_a_cycle():
    graph = {p.stem: _imports(p) for p in DATA.glob("*.py")}
    assert graph["tokenizer"] >= {"builtin_bpe", "spm", "pieces"}  # the parser sees the real imports
    assert "tokenizer" not in graph["builtin_bpe"] and "tokenizer" not in graph["sources"]
    assert _cycle(graph) == []

"""The package's layers: lower ones never import higher ones, and no module imports itself back
through others -- counting the imports inside functions, which are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import lomar

PACKAGE = Path(lomar.__file__).parent
LOWER = {"models", "tokenizers", "data", "checkpoints"}
HIGHER = {"methods", "train", "eval", "viz", "bench", "cli", "integrations"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["lomar", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the lomar modules it imports anywhere in its source (top level or inside a function)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle_even_through_imports_inside_functions():
    assert _cycles(import_graph()) == []


def test_lower_layers_never_import_higher_ones():
    upward = sorted(f"{m} -> {t}" for m, targets in import_graph().items() if _layer(m) in LOWER
                    for t in targets if _layer(t) in HIGHER)
    assert upward == []


def test_the_checker_sees_a_cycle_and_an_import_inside_a_function():
    graph = {"lomar.a": {"lomar.b"}, "lomar.b": {"lomar.a"}, "lomar.c": set()}
    assert _cycles(graph) == [["lomar.a", "lomar.b"]]
    assert "lomar.methods" in import_graph()["lomar.train.config"]  # imported inside functions there


def test_no_module_is_over_400_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}

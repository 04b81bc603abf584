"""The shape of src/ stays as the README's layout says: layers import only downward (no cycle,
function-level imports included), the CLIs never import each other, and every file, function and
class fits in a head."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CLIS = {"sweep", "final_test", "stack", "register", "predict", "export"}


def _modules() -> dict[str, ast.Module]:
    return {f.stem: ast.parse(f.read_text()) for f in sorted(SRC.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Our modules a module imports, anywhere in it (`from . import x`, `from .x import y`)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("src."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycle_and_no_cli_imports_another():
    graph = {name: _imports(tree) for name, tree in _modules().items()}
    for cli in CLIS:
        assert not graph.get(cli, set()) & (CLIS - {cli}), cli

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(name for name in graph if name in reach(name))
    assert cycles == []


def test_files_functions_and_classes_fit_in_a_head():
    too_big = []
    for name, tree in _modules().items():
        lines = len((SRC / f"{name}.py").read_text().splitlines())
        if lines > 300:
            too_big.append(f"{name}.py: {lines} lines")
        for node in ast.walk(tree):
            limit = {ast.FunctionDef: 60, ast.AsyncFunctionDef: 60, ast.ClassDef: 120}.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []


def test_only_trials_touches_optunas_private_storage_api():
    users = sorted(f.stem for f in SRC.glob("*.py")
                   if any(word in f.read_text() for word in ("._storage", "._trial_id", "._study_id")))
    assert users == ["trials"]


def test_only_tracking_and_the_logged_model_import_mlflow():
    importers = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(name)
    assert importers == {"tracking", "served"}

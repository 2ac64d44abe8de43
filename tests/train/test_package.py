"""The layout of attnlab.train: modules share only public names, and plotting/printing deps load lazily."""
from __future__ import annotations

import ast
from pathlib import Path

import attnlab.train

PACKAGE = Path(attnlab.train.__file__).parent
LAZY = ("matplotlib", "rich")      # the package may become an optional extra; train() must not need them to import


def _modules() -> dict[str, ast.Module]:
    return {p.name: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_module_imports_another_modules_private_names():
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnlab"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"


def test_only_matplotlib_and_rich_are_imported_inside_functions():
    for name, tree in _modules().items():
        for stmt in tree.body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in stmt.names] if isinstance(stmt, ast.Import) else [stmt.module or ""]
                assert not any(m.split(".")[0] in LAZY for m in modules), f"{name} imports {modules} at the top"
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                        assert all(m.split(".")[0] in LAZY for m in modules), \
                            f"{name}:{func.name} imports {modules} inside a function"

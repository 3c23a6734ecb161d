"""What `pip install minimind_fast` brings must be enough to run it: every third-party module the package
imports outside an `except ImportError` guard is a declared requirement (not only a dev extra's)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

from launch_helpers import ROOT

OWN = {"minimind_fast", "kernels", "__future__"}


def install_requires() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    listed = next(k.value for k in call.keywords if k.arg == "install_requires")
    return {normalise(re.split(r"[<>=!~;\[ ]", ast.literal_eval(item))[0]) for item in listed.elts}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a `try` one of whose handlers catches ImportError (an optional dependency)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers):
            return True
    return False


def unguarded_imports() -> dict[str, str]:
    """Top-level module -> one `file:line` importing it without a guard."""
    found: dict[str, str] = {}
    for path in sorted([*(ROOT / "minimind_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in OWN and top not in sys.stdlib_module_names and not guarded(node, parents):
                    found.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_module_the_package_imports_is_an_install_requirement():
    declared = install_requires()
    distributions = importlib.metadata.packages_distributions()
    missing = {where: module for module, where in unguarded_imports().items()
               if not {normalise(d) for d in distributions.get(module, [module])} & declared}
    assert not missing, f"imported but not in setup.py's install_requires: {missing}"

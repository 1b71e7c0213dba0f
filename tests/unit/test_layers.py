"""One-way packages: imports flow infra/benchmarks -> sim -> edge_client -> fedcore, functions -> fedcore.

The Lambda bundle is ``functions/`` plus ``fedcore/`` and must stay free of
torch and of the device and server-booting code; the device package must not
start servers; the simulator must not either. This reads every module's
source with ``ast`` (nothing is imported, no ``sam build``), so an import
hidden inside a function, a ``TYPE_CHECKING`` block or an ``importlib`` call
counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it may never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "edge_client": frozenset({"infra", "sim", "benchmarks"}),
    "sim": frozenset({"infra", "benchmarks"}),
    "fedcore": frozenset({"torch", "opacus", "edge_client", "sim", "infra", "benchmarks"}),
    "functions": frozenset({"torch", "opacus", "edge_client", "sim", "infra", "benchmarks"}),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(
    source: str, module: str, *, is_package: bool = False
) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, at any depth.

    Relative imports are resolved against ``module``; ``importlib.import_module``
    and ``__import__`` with a literal name count too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".") if node.level else []
            base = base[: len(base) - (node.level - 1)] if node.level else base
            if node.module:
                found.append((node.lineno, ".".join([*base, node.module])))
            else:  # ``from . import x``: x is a module of the package
                found += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func, first = node.func, node.args[0]
            dynamic = (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
                isinstance(func, ast.Name) and func.id in ("__import__", "import_module")
            )
            if dynamic and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, first.value))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = module_name(path)
        for line, name in imported_modules(
            path.read_text(), module, is_package=path.name == "__init__.py"
        ):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_flow_one_way(package: str) -> None:
    """
    GIVEN every .py file of ``package``
    WHEN its imports are read (top level, inside functions, relative, importlib)
    THEN none names a package that ``package`` sits below
    """
    assert any((ROOT / package).rglob("*.py")), f"no modules found under {package}/"
    assert violations(package) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch", "torch"),
        ("import infra.stack as s", "infra.stack"),
        ("from infra.demo import cohort_outcomes", "infra.demo"),
        ("def run():\n    from infra.stack import LocalStack\n", "infra.stack"),
        ("if TYPE_CHECKING:\n    import torch.nn\n", "torch.nn"),
        ("from ..infra import stack", "infra"),
        ("from .. import infra", "infra"),
        ("import importlib\nimportlib.import_module('infra.s3server')", "infra.s3server"),
    ],
)
def test_the_checker_sees_every_kind_of_import(source: str, expected: str) -> None:
    """The rule is only as good as its import finder: each form above is found."""
    names = [name for _, name in imported_modules(source, "edge_client.simulate")]
    assert expected in names

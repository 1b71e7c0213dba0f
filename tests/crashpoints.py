"""Crash-point injection: kill a process before or after any storage call, by call site.

A *call site* is a place in the source that touches the store (``self.store.put_new``,
``store.head``, ...), found statically with ``ast``. ``CrashingStore`` wraps a real store
and, while armed, kills the caller the first time each site is reached: ``Killed`` is a
``BaseException`` so no ``except Exception`` in the code under test can swallow it, as
nothing can catch a Lambda that dies or times out. The test then redelivers the event (a
fresh invocation, caches gone) and checks the bucket afterwards.
"""

from __future__ import annotations

import ast
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STORE_METHODS = frozenset(
    {"get", "get_range", "head", "put_new", "put_if_match", "put", "delete", "delete_many",
     "list", "list_prefixes"}
)  # fmt: skip


PROJECT = ("fedcore", "functions")


class Killed(BaseException):
    """The process died here (an injected crash)."""


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository root
    function: str
    method: str
    line: int
    end_line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.function} -> store.{self.method}"


def _is_store(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "store") or (
        isinstance(node, ast.Attribute) and node.attr == "store"
    )


def _module_file(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imported_files(entry_points: list[str], packages: tuple[str, ...] = PROJECT) -> list[str]:
    """The entry points and every project module they import, transitively (paths from the root).

    Found statically (every ``import`` statement, including those inside functions), so
    a module split out of one the functions use is scanned for call sites without being
    listed by hand.
    """
    seen: set[Path] = set()
    todo = [ROOT / e for e in entry_points]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this file's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            for name in names:
                parts = name.split(".")
                if parts[0] not in packages:
                    continue
                for i in range(1, len(parts) + 1):  # the packages on the way are run too
                    if (found := _module_file(".".join(parts[:i]))) is not None:
                        todo.append(found)
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def call_sites(paths: list[str]) -> list[Site]:
    """Every ``<...>store.<method>`` reference in these files (called or passed on)."""
    sites = []
    for rel in paths:
        tree = ast.parse((ROOT / rel).read_text(), filename=rel)
        stack: list[str] = []

        def visit(node: ast.AST, rel: str = rel, stack: list[str] = stack) -> None:
            named = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            if named:
                stack.append(node.name)  # type: ignore[attr-defined]
            if (
                isinstance(node, ast.Attribute)
                and node.attr in STORE_METHODS
                and _is_store(node.value)
            ):
                fn = ".".join(stack) or "<module>"
                sites.append(Site(rel, fn, node.attr, node.lineno, node.end_lineno or node.lineno))
            for child in ast.iter_child_nodes(node):
                visit(child)
            if named:
                stack.pop()

        visit(tree)
    return sites


class CrashingStore:
    """A store that kills its caller at the first arrival at each site by each path."""

    def __init__(self, store: Any, sites: list[Site]) -> None:
        self._store = store
        self._by_file: dict[str, list[Site]] = {}
        for s in sites:
            self._by_file.setdefault(str(ROOT / s.path), []).append(s)
        self.mode: str | None = None  # "before", "after" or None (disarmed)
        self.crashed: set[Site] = set()
        self.reached: set[Site] = set()
        self._done: set[tuple[Site, tuple[str, ...]]] = set()
        self._project = tuple(str(ROOT / d) for d in PROJECT)
        self._lock = threading.Lock()

    @property
    def crash_points(self) -> int:
        return len(self._done)

    @property
    def bucket(self) -> str:
        return self._store.bucket

    def _where(self, method: str) -> tuple[Site | None, tuple[str, ...]]:
        """The call site, and the chain of project functions that led to it.

        Crashing once per (site, chain) rather than once per site matters where
        one helper serves two paths (``_delete_checkins`` at formation and at the
        result): each path gets its own crash.
        """
        frame = sys._getframe(2)
        site = None
        chain: list[str] = []
        while frame is not None:
            code = frame.f_code
            if code.co_filename.startswith(self._project):
                chain.append(f"{code.co_filename}:{code.co_name}")
            if site is None:
                for s in self._by_file.get(code.co_filename, ()):
                    if s.method == method and s.line <= frame.f_lineno <= s.end_line:
                        site = s
            frame = frame.f_back  # type: ignore[assignment]
        return site, tuple(chain)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        site, chain = self._where(method)
        crash = False
        if site is not None:
            with self._lock:
                self.reached.add(site)
                if self.mode is not None and (site, chain) not in self._done:
                    self._done.add((site, chain))
                    self.crashed.add(site)
                    crash = True
        if crash and self.mode == "before":
            raise Killed(f"before {site}")
        result = getattr(self._store, method)(*args, **kwargs)
        if method == "list":  # a lazy listing: "after" means after its requests ran
            result = iter(list(result))
        if crash:
            raise Killed(f"after {site}")
        return result

    def __getattr__(self, name: str) -> Any:
        if name in STORE_METHODS:
            return lambda *a, **k: self._call(name, *a, **k)
        return getattr(self._store, name)

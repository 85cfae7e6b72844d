"""The Python standard library as a corpus: its pure-Python modules, split by top-level module.

Modules are found by walking the running interpreter's stdlib directory and read with ``ast``; nothing
is imported, and the import system is never asked where a module lives: in a virtual environment it
can answer with a file outside the stdlib (``distutils`` resolves to setuptools' copy in
site-packages), and only files under the stdlib root are stdlib text. The split is by *top-level*
module: ``is_heldout("stdlib", top)`` where ``top`` is ``"asyncio"`` for ``asyncio.tasks``, so a
package is wholly held out or wholly training text. Test packages (``test``, ``*/test``, ``*/tests``,
``idlelib/idle_test``) are left out of both: they restate much of the code they test.
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from specjax.datasets.splits import is_heldout

SOURCE = "stdlib"  # the corpus name given to is_heldout
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class StdlibModule:
    """A pure-Python stdlib module: dotted ``name`` (``json.decoder``; ``json`` for its ``__init__``) and file."""

    name: str
    path: Path

    @property
    def top(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def heldout(self) -> bool:
        return is_heldout(SOURCE, self.top)

    @property
    def public(self) -> bool:
        return not any(part.startswith("_") for part in self.name.split("."))

    @property
    def relpath(self) -> str:
        return self.path.relative_to(stdlib_root()).as_posix()

    def source(self) -> str:
        return module_source(self.path)

    def tree(self) -> ast.Module | None:
        return module_tree(self.path)


def stdlib_root() -> Path:
    return Path(sysconfig.get_path("stdlib"))


@functools.lru_cache(maxsize=1)
def stdlib_modules() -> tuple[StdlibModule, ...]:
    """Every ``.py`` module of the standard library outside the test packages, sorted by name."""
    root = stdlib_root()
    names = set(sys.stdlib_module_names) - {"test"}
    modules = []
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        parts = here.relative_to(root).parts
        if parts and parts[0] not in names:
            subdirs.clear()
            continue
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("config-")
                            and (parts or d in names))
        for file in sorted(files):
            if not file.endswith(".py") or (not parts and file[:-3] not in names):
                continue
            dotted = [*parts, file[:-3]]
            if dotted[-1] == "__init__":
                dotted.pop()
            if dotted and dotted[-1] != "__main__" and all(p.isidentifier() for p in dotted):
                modules.append(StdlibModule(".".join(dotted), here / file))
    modules.sort(key=lambda m: m.name)
    return tuple(modules)


@functools.cache
def module_source(path: Path) -> str:
    with tokenize.open(path) as f:  # honours a coding declaration
        return f.read()


@functools.cache
def module_tree(path: Path) -> ast.Module | None:
    try:
        return ast.parse(module_source(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None


def stdlib_split(split: Literal["train", "heldout"]) -> list[StdlibModule]:
    return [m for m in stdlib_modules() if m.heldout == (split == "heldout")]


# ---------------------------------------------------------------------------- training text
def stdlib_training_texts() -> Iterator[str]:
    """The stdlib text training may use: the source of every module that is not held out, then the
    language-reference topics shipped in ``pydoc_data`` (when ``pydoc_data`` is not held out).

    No held-out module's source is among them; the test packages are not either.
    """
    for module in stdlib_split("train"):
        yield module.source()
    topics = next((m for m in stdlib_split("train") if m.name == "pydoc_data.topics"), None)
    if topics is not None and topics.tree() is not None:
        for node in topics.tree().body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        yield value.value

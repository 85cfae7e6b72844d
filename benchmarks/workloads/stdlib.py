"""The Python standard library as data: the ``code`` workload (held-out modules) and training text (the rest).

Modules are found by walking the running interpreter's stdlib directory and read with ``ast``; nothing
is imported. The split is by *top-level* module: ``training.splits.is_heldout("stdlib", top)`` where
``top`` is ``"asyncio"`` for ``asyncio.tasks``, so a package is wholly held out or wholly training
text. Test packages (``test``, ``*/test``, ``*/tests``, ``idlelib/idle_test``) are left out of both:
they restate much of the code they test.

The ``code`` workload turns documented public functions of held-out modules into prompts such as
"Write a Python function `quote(s)` that returns ...", with the stdlib implementation as
``reference``. A function that looks copied in a training module (its docstring's first line, or half
of its lines, recur there verbatim) is left out, so the workload stays unseen.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import sysconfig
import textwrap
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from benchmarks.workloads.base import Request, rng_for, take, token_budget
from training.splits import is_heldout

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


# ---------------------------------------------------------------------------- functions
def source_segment(lines: list[str], node: ast.AST) -> str:
    """The lines of ``node`` (decorators included) from a module's ``splitlines(keepends=True)``."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return "".join(lines[first - 1:node.end_lineno])


def first_sentence(docstring: str) -> str | None:
    """The docstring's first sentence on one line, or None when it does not read as a description."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(`\"'])", paragraph, maxsplit=1)[0].strip()
    if not 12 <= len(sentence) <= 250 or ">>>" in sentence or not sentence[0].isupper():
        return None
    if re.match(r"^[\w.]+\(.*\)\s*(->|$)", sentence):  # a signature line, not prose
        return None
    return sentence if sentence[-1] in ".!?" else sentence + "."


@functools.lru_cache(maxsize=1)
def _training_lines() -> frozenset[str]:
    """Every stripped line of the training texts, to spot held-out code that is copied elsewhere."""
    return frozenset(line.strip() for text in stdlib_training_texts() for line in text.splitlines())


def seen_in_training(source: str) -> bool:
    """Whether a held-out function's source looks copied in a training module: its docstring's first
    line recurs there verbatim, or half of its substantive lines do (``posixpath``/``ntpath`` twins)."""
    known = _training_lines()
    node = ast.parse(textwrap.dedent(source)).body[0]
    lines = textwrap.dedent(source).splitlines()
    doc_line = lines[node.body[0].lineno - 1].strip() if ast.get_docstring(node) is not None else ""
    if len(doc_line) >= 24 and doc_line in known:
        return True
    substantive = [line.strip() for line in lines if len(line.strip()) >= 12 and not line.strip().startswith("#")]
    return bool(substantive) and sum(line in known for line in substantive) >= 0.5 * len(substantive)


@dataclass(frozen=True)
class DocumentedFunction:
    module: str
    name: str  # "quote", or "Class.method" for a method
    signature: str  # "a, b=1, *args" plus " -> T" when annotated
    sentence: str  # the docstring's first sentence
    source: str  # the implementation, decorators included (a method keeps its indentation)
    is_async: bool

    @property
    def is_method(self) -> bool:
        return "." in self.name


def _documented(node: ast.AST, qualname: str, module: str, lines: list[str]) -> DocumentedFunction | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
        return None
    if any("property" in ast.unparse(d) or "setter" in ast.unparse(d) or "overload" in ast.unparse(d)
           for d in node.decorator_list):
        return None
    doc = ast.get_docstring(node)
    sentence = first_sentence(doc) if doc else None
    if sentence is None:
        return None
    signature = ast.unparse(node.args) + (f" -> {ast.unparse(node.returns)}" if node.returns else "")
    return DocumentedFunction(module, qualname, signature, sentence, source_segment(lines, node),
                              isinstance(node, ast.AsyncFunctionDef))


@functools.lru_cache(maxsize=1)
def heldout_functions() -> tuple[DocumentedFunction, ...]:
    """Public documented functions, and public documented methods of public classes, of public
    held-out modules, in module order; those that look copied in a training module are left out."""
    found = []
    for module in stdlib_split("heldout"):
        tree = module.tree()
        if tree is None or not module.public:
            continue
        lines = module.source().splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                candidates = [(node, node.name)]
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                candidates = [(item, f"{node.name}.{getattr(item, 'name', '')}") for item in node.body]
            else:
                continue
            for item, qualname in candidates:
                function = _documented(item, qualname, module.name, lines)
                if function is not None and not seen_in_training(function.source):
                    found.append(function)
    return tuple(found)


# ---------------------------------------------------------------------------- the code workload
_IMPERATIVES = frozenset(
    "add apply build calculate call cancel check clear close combine compare compute construct convert copy count "
    "create decode decorate delete determine encode ensure escape execute extract fetch fill find flush format "
    "generate get handle initialize insert join list load lock look make map match normalize open pack parse "
    "perform print process put quote raise read receive register release remove rename replace reset resolve "
    "retrieve return run save schedule search send set shut sort split start stop strip submit take test "
    "translate try turn unpack unquote unregister update wait wrap write yield".split())


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if len(verb) > 1 and verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def describe(sentence: str) -> str | None:
    """"Return the sum." -> "returns the sum"; None when the sentence does not start with an imperative."""
    first, _, rest = sentence.rstrip(".!?").partition(" ")
    word = first.lower()
    if word == "same" and rest.startswith("as "):  # operator's "Same as a + b."
        return f"computes the same as {rest[3:]}"
    if word in _IMPERATIVES:
        verb = _third_person(word)
    elif word in {_third_person(w) for w in _IMPERATIVES}:
        verb = word  # already "Returns ..."
    else:
        return None
    # "... and return the count" -> "... and returns the count"
    rest = re.sub(r"\b(and|or) (\w+)\b",
                  lambda m: f"{m[1]} {_third_person(m[2]) if m[2] in _IMPERATIVES else m[2]}", rest)
    return f"{verb} {rest}".strip()


def code_prompt(function: DocumentedFunction, style: int) -> str:
    """The request for one function; ``style`` (0 or 1) picks the wording when the docstring allows."""
    kind = "async " if function.is_async else ""
    if function.is_method:
        cls, name = function.name.split(".")
        what = f"the {kind}method `{name}({function.signature})` of the class `{cls}`"
    else:
        what = f"a Python {kind}function `{function.name}({function.signature})`"
    clause = describe(function.sentence)
    if clause is None:
        return f"Write {what}. Its docstring begins: \"{function.sentence}\""
    if style == 0:
        return f"Write {what} that {clause}."
    return f"Implement {what} (as in the `{function.module}` module): it {clause}."


def code_workload(n: int | None = 200, seed: int = 0) -> list[Request]:
    """``n`` "write a function that ..." prompts from held-out modules, in an order shuffled by ``seed``."""
    functions = list(heldout_functions())
    rng = rng_for("code", seed)
    rng.shuffle(functions)
    requests = (
        Request(id=f"code/{f.module}.{f.name}", workload="code",
                messages=[{"role": "user", "content": code_prompt(f, rng.randrange(2))}],
                session=f"code/{f.module}.{f.name}", turn=0, reference=f.source,
                max_tokens=max(128, min(1024, token_budget(f.source, 3.5, 32))),
                meta={"source": SOURCE, "module": f.module, "function": f.name})
        for f in functions)
    return take(requests, n)

"""The ``code`` workload: "write this function" prompts from held-out standard-library modules.

Documented public functions of held-out modules (``specjax.datasets.stdlib``) become prompts such as
"Write a Python function `quote(s)` that returns ...", with the stdlib implementation as
``reference``. A function that looks copied in a training module (its docstring's first line, or half
of its lines, recur there verbatim) is left out, so the workload stays unseen.
"""

from __future__ import annotations

import ast
import functools
import textwrap

from benchmarks.workloads.base import Request, rng_for, take, token_budget
from specjax.datasets.code_prompts import DocumentedFunction, code_prompt, first_sentence
from specjax.datasets.stdlib import SOURCE, stdlib_split, stdlib_training_texts


def source_segment(lines: list[str], node: ast.AST) -> str:
    """The lines of ``node`` (decorators included) from a module's ``splitlines(keepends=True)``."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return "".join(lines[first - 1:node.end_lineno])


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

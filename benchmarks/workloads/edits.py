"""The ``agentic-edit`` workload: apply an edit to a file and answer with the whole edited file.

A file is an excerpt of a held-out stdlib module: consecutive top-level statements, 40-200 lines.
A session edits one file 3-5 times; each turn's file is the previous turn's answer, so most of an
answer repeats the prompt and the previous answer (where suffix decoding shines).

Each edit is a small text transformation with a known effect on the syntax tree, and is kept only
when the two agree: the edited text must parse to exactly the tree the edit predicts. Kinds:

- ``rename_function``: a top-level function and every reference to it (names in code; comments and
  strings stay as they are).
- ``rename_variable``: a local variable of a function or method, inside that function.
- ``add_docstring_line``: a one-line docstring for a function without one, or one more line at the
  end of a multi-line docstring.
- ``change_constant``: a numeric module or class constant, or a numeric default argument.
- ``add_parameter``: a parameter with a default value at the end of a parameter list.
"""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import io
import keyword
import random
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchmarks.workloads.base import Request, rng_for, take, token_budget
from specjax.datasets.stdlib import StdlibModule, stdlib_split

MIN_LINES, MAX_LINES = 40, 200
SYSTEM_PROMPT = ("You are a careful coding assistant. When asked to change a file, apply exactly the requested "
                 "change and nothing else, and reply with the complete updated file in a single ```python code "
                 "block, with no explanation.")

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


@dataclass(frozen=True)
class Excerpt:
    """Lines ``first``..``last`` (1-based, inclusive) of a held-out module, as one file."""

    module: str
    relpath: str
    first: int
    last: int
    text: str


@dataclass(frozen=True)
class Edit:
    """One applied edit: ``instruction`` for the model, ``source`` the edited file, ``details`` the facts
    (kind-specific: ``old``/``new`` names or values, the function ``qualname``, the inserted ``text``)."""

    kind: str
    instruction: str
    source: str
    details: dict


# ---------------------------------------------------------------------------- files
def _first_line(node: ast.AST) -> int:
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])


def module_excerpts(module: StdlibModule) -> list[Excerpt]:
    """The module cut into excerpts of consecutive top-level statements, each 40-200 lines with a function.

    Lengths are drawn per excerpt (skewed towards short files) from a generator seeded by the module's
    name, so the cut does not depend on the workload's seed.
    """
    tree = module.tree()
    if tree is None:
        return []
    lines = module.source().splitlines()
    nodes = tree.body
    rng = rng_for("excerpt", module.name)
    excerpts, i = [], 0
    while i < len(nodes):
        target = MIN_LINES + int((MAX_LINES - MIN_LINES) * rng.random() ** 2)
        j = i
        while j + 1 < len(nodes) and nodes[j].end_lineno - _first_line(nodes[i]) + 1 < target:
            j += 1
        while j > i and nodes[j].end_lineno - _first_line(nodes[i]) + 1 > MAX_LINES:
            j -= 1
        first, last = _first_line(nodes[i]), nodes[j].end_lineno
        has_function = any(isinstance(n, _FUNCTIONS) for node in nodes[i:j + 1] for n in ast.walk(node))
        if MIN_LINES <= last - first + 1 <= MAX_LINES and has_function:
            text = "\n".join(lines[first - 1:last]) + "\n"
            try:
                ast.parse(text)
            except SyntaxError:
                pass
            else:
                excerpts.append(Excerpt(module.name, module.relpath, first, last, text))
        i = j + 1
    return excerpts


@functools.lru_cache(maxsize=1)
def heldout_excerpts() -> tuple[Excerpt, ...]:
    return tuple(e for module in stdlib_split("heldout") for e in module_excerpts(module))


# ---------------------------------------------------------------------------- helpers
def _functions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Top-level functions and methods of top-level classes, by qualified name; names seen twice dropped."""
    found = []
    for node in tree.body:
        if isinstance(node, _FUNCTIONS):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            found += [(f"{node.name}.{item.name}", item) for item in node.body if isinstance(item, _FUNCTIONS)]
    counts: dict[str, int] = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    return [(name, node) for name, node in found if counts[name] == 1]


def _describe(qualname: str) -> str:
    return f"method `{qualname}`" if "." in qualname else f"function `{qualname}`"


def _identifiers(source: str) -> set[str]:
    """Every name token in the file, plus keywords and builtins: what a new name must not collide with."""
    names = {tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.NAME}
    return names | set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))


def _replace(source: str, spans: list[tuple[int, int, int]], text: str) -> str:
    """Replace ``(line, start, end)`` spans (1-based lines, UTF-8 byte columns as ast gives them) by ``text``."""
    lines = source.split("\n")
    for line, start, end in sorted(set(spans), reverse=True):
        raw = lines[line - 1].encode()
        lines[line - 1] = (raw[:start] + text.encode() + raw[end:]).decode()
    return "\n".join(lines)


def _insert_line(source: str, before: int, text: str) -> str:
    """Insert ``text`` as a new line before 1-based line ``before``."""
    lines = source.split("\n")
    lines.insert(before - 1, text)
    return "\n".join(lines)


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _bindings(tree: ast.AST) -> Iterator[str]:
    """Every name bound anywhere in ``tree`` other than by plain assignment to a Name."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, ast.arg):
            yield node.arg
        elif isinstance(node, ast.alias):
            yield (node.asname or node.name).split(".")[0]
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            yield from node.names
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            yield node.name
        elif isinstance(node, ast.MatchMapping) and node.rest:
            yield node.rest


def _in_fstring(tree: ast.AST) -> set[int]:
    """ids of the nodes inside f-strings (their positions are not trusted)."""
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for n in ast.walk(node)}


def _same_tree(source: str, expected: ast.AST) -> bool:
    try:
        return ast.dump(ast.parse(source)) == ast.dump(expected)
    except SyntaxError:
        return False


def _find_function(tree: ast.Module, qualname: str) -> ast.AST:
    return dict(_functions(tree))[qualname]


# ---------------------------------------------------------------------------- the edits
def rename_function(source: str, rng: random.Random) -> Edit | None:
    tree = ast.parse(source)
    taken = _identifiers(source)
    bound = list(_bindings(tree))
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    candidates = [n for n in tree.body if isinstance(n, _FUNCTIONS) and bound.count(n.name) == 1
                  and n.name not in assigned]
    rng.shuffle(candidates)
    in_fstring = _in_fstring(tree)
    for node in candidates:
        old = node.name
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == old]
        if any(id(n) in in_fstring for n in uses):
            continue
        base = old.lstrip("_")
        prefix = old[:len(old) - len(base)]
        options = [prefix + name for name in (f"{base}_impl", f"do_{base}", f"{base}_v2", f"new_{base}",
                                              f"{base}_func")]
        rng.shuffle(options)
        new = next((name for name in options if name not in taken), None)
        if new is None:
            continue
        line = source.split("\n")[node.lineno - 1]
        start = line.find(f"def {old}(") + 4
        if start < 4:
            continue
        col = len(line[:start].encode())
        spans = [(node.lineno, col, col + len(old.encode()))]
        spans += [(n.lineno, n.col_offset, n.end_col_offset) for n in uses]
        edited = _replace(source, spans, new)
        expected = copy.deepcopy(tree)
        for n in ast.walk(expected):
            if isinstance(n, _FUNCTIONS) and n.name == old:
                n.name = new
            elif isinstance(n, ast.Name) and n.id == old:
                n.id = new
        if _same_tree(edited, expected):
            return Edit("rename_function",
                        f"Rename the function `{old}` to `{new}` and update every use of it in the code "
                        f"(leave comments and strings unchanged).",
                        edited, {"old": old, "new": new, "qualname": old})
    return None


_VARIABLE_NAMES = ("result", "value", "item", "entry", "current", "data", "buf", "parts", "count", "index", "text",
                   "obj", "tmp", "acc", "node", "chunk", "state", "total", "pending", "target", "info", "res")


def rename_variable(source: str, rng: random.Random) -> Edit | None:
    tree = ast.parse(source)
    taken = _identifiers(source)
    in_fstring = _in_fstring(tree)
    candidates = []
    for qualname, function in _functions(tree):
        nested = [n for child in function.body for n in ast.walk(child) if isinstance(n, _SCOPES)]
        in_nested = {n.id for scope in nested for n in ast.walk(scope) if isinstance(n, ast.Name)}
        in_nested |= {name for scope in nested for name in _bindings(scope)}
        special = set(_bindings(function))  # parameters, globals, except names, imports, ...
        names = [n for child in function.body for n in ast.walk(child) if isinstance(n, ast.Name)]
        stored = sorted({n.id for n in names if isinstance(n.ctx, ast.Store)})
        for var in stored:
            uses = [n for n in names if n.id == var]
            if var.isupper() or var in in_nested or var in special or any(id(n) in in_fstring for n in uses):
                continue
            candidates.append((qualname, var, uses))
    rng.shuffle(candidates)
    for qualname, old, uses in candidates:
        options = [name for name in _VARIABLE_NAMES if name not in taken]
        if not options:
            continue
        new = rng.choice(options)
        edited = _replace(source, [(n.lineno, n.col_offset, n.end_col_offset) for n in uses], new)
        expected = copy.deepcopy(tree)
        for child in _find_function(expected, qualname).body:
            for n in ast.walk(child):
                if isinstance(n, ast.Name) and n.id == old:
                    n.id = new
        if _same_tree(edited, expected):
            return Edit("rename_variable",
                        f"In the {_describe(qualname)}, rename the local variable `{old}` to `{new}`.",
                        edited, {"old": old, "new": new, "qualname": qualname})
    return None


_DOC_LINES = (
    "Note: this is not thread-safe.",
    "It is safe to call this more than once.",
    "See the module documentation for details.",
    "Kept for backward compatibility.",
    "Callers must not hold any locks when calling this.",
    "This is covered by the module's test suite.",
    "Errors are reported by raising an exception.",
    "The behaviour may change in a future release.",
)


def add_docstring_line(source: str, rng: random.Random) -> Edit | None:
    tree = ast.parse(source)
    lines = source.split("\n")
    candidates = _functions(tree)
    rng.shuffle(candidates)
    for qualname, function in candidates:
        text = rng.choice(_DOC_LINES)
        first = function.body[0]
        doc = ast.get_docstring(function, clean=False)
        expected = copy.deepcopy(tree)
        target = _find_function(expected, qualname)
        if doc is None:
            at = _first_line(first)
            if at <= function.lineno:
                continue  # body on the def line
            while at - 1 > function.lineno and lines[at - 2].lstrip().startswith("#"):
                at -= 1  # put the docstring above the comments that open the body
            edited = _insert_line(source, at, f'{_indent(lines[_first_line(first) - 1])}"""{text}"""')
            target.body.insert(0, ast.Expr(ast.Constant(text)))
            instruction = f"Add a one-line docstring to the {_describe(qualname)} that reads exactly: {text}"
            how = "new"
        else:
            closing = lines[first.end_lineno - 1]
            if first.lineno == first.end_lineno or closing.strip() not in ('"""', "'''") or \
                    lines[first.end_lineno - 2].endswith("\\"):
                continue
            indent = _indent(closing)
            edited = _insert_line(source, first.end_lineno, indent + text)
            target.body[0].value.value = doc + text + "\n" + indent
            instruction = f'Add the line "{text}" at the end of the docstring of the {_describe(qualname)}.'
            how = "appended"
        if _same_tree(edited, expected):
            return Edit("add_docstring_line", instruction, edited, {"qualname": qualname, "text": text, "how": how})
    return None


def _new_number(value: float, rng: random.Random) -> int | float:
    if isinstance(value, int):
        options = [value * 2, value + 1, value * 10] if value else [1, 10]
    else:
        options = [value * 2, value / 2] if value else [1.0]
    return rng.choice(options)


def change_constant(source: str, rng: random.Random) -> Edit | None:
    tree = ast.parse(source)
    lines = source.split("\n")
    candidates = []  # (description, constant node)

    def plain_number(node: ast.AST) -> bool:
        if not (isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.lineno == node.end_lineno):
            return False
        literal = lines[node.lineno - 1].encode()[node.col_offset:node.end_col_offset].decode()
        return literal == repr(node.value)

    scopes = [(None, tree.body)] + [(n.name, n.body) for n in tree.body if isinstance(n, ast.ClassDef)]
    for owner, body in scopes:
        targets = [t.id for n in body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)]
        for node in body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and targets.count(node.targets[0].id) == 1 and plain_number(node.value):
                name = node.targets[0].id
                where = f"the constant `{name}`" if owner is None else f"the class attribute `{owner}.{name}`"
                candidates.append((where, node.value))
    for qualname, function in _functions(tree):
        args = function.args
        positional = args.posonlyargs + args.args
        pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        for arg, default in pairs:
            if plain_number(default):
                candidates.append((f"the default value of the parameter `{arg.arg}` of the {_describe(qualname)}",
                                   default))
    rng.shuffle(candidates)
    for where, node in candidates:
        old = node.value
        new = _new_number(old, rng)
        if repr(new) == repr(old):
            continue
        edited = _replace(source, [(node.lineno, node.col_offset, node.end_col_offset)], repr(new))
        expected = copy.deepcopy(tree)
        for n in ast.walk(expected):
            if isinstance(n, ast.Constant) and (n.lineno, n.col_offset) == (node.lineno, node.col_offset):
                n.value = new
        if _same_tree(edited, expected):
            return Edit("change_constant", f"Change {where} from {old!r} to {new!r}.", edited,
                        {"old": repr(old), "new": repr(new), "line": node.lineno, "where": where})
    return None


_NEW_PARAMETERS = (("timeout", "None"), ("verbose", "False"), ("strict", "True"), ("encoding", "'utf-8'"),
                   ("retries", "3"), ("limit", "None"), ("debug", "False"), ("callback", "None"))


def _parameter_list_end(lines: list[str], function: ast.AST) -> tuple[int, int, str] | None:
    """``(line, column, token before it)`` of the ``)`` that closes the parameter list (column in characters)."""
    text = "\n".join(lines[function.lineno - 1:function.body[0].lineno])
    depth, previous = 0, None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
                if depth == 0:
                    return function.lineno + tok.start[0] - 1, tok.start[1], previous.string
            if tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.NEWLINE):
                previous = tok
    except tokenize.TokenError:
        return None
    return None


def add_parameter(source: str, rng: random.Random) -> Edit | None:
    tree = ast.parse(source)
    lines = source.split("\n")
    candidates = [(q, f) for q, f in _functions(tree) if f.args.kwarg is None]
    rng.shuffle(candidates)
    for qualname, function in candidates:
        used = {n.id for n in ast.walk(function) if isinstance(n, ast.Name)} | set(_bindings(function))
        options = [p for p in _NEW_PARAMETERS if p[0] not in used]
        end = _parameter_list_end(lines, function)
        if not options or end is None or end[2] == ",":
            continue
        name, default = rng.choice(options)
        line, col, before = end
        insert = f"{name}={default}" if before == "(" else f", {name}={default}"
        edited_lines = list(lines)
        edited_lines[line - 1] = lines[line - 1][:col] + insert + lines[line - 1][col:]
        edited = "\n".join(edited_lines)
        expected = copy.deepcopy(tree)
        args = _find_function(expected, qualname).args
        if args.vararg is not None or args.kwonlyargs:
            args.kwonlyargs.append(ast.arg(name))
            args.kw_defaults.append(ast.parse(default, mode="eval").body)
        else:
            args.args.append(ast.arg(name))
            args.defaults.append(ast.parse(default, mode="eval").body)
        if _same_tree(edited, expected):
            return Edit("add_parameter",
                        f"Add a parameter `{name}` with the default value `{default}` at the end of the parameter "
                        f"list of the {_describe(qualname)}. Do not use it anywhere yet.",
                        edited, {"qualname": qualname, "name": name, "default": default})
    return None


EDITS: dict[str, Callable[[str, random.Random], Edit | None]] = {
    "rename_function": rename_function,
    "rename_variable": rename_variable,
    "add_docstring_line": add_docstring_line,
    "change_constant": change_constant,
    "add_parameter": add_parameter,
}


def edit_session(source: str, turns: int, rng: random.Random) -> list[Edit]:
    """Up to ``turns`` edits applied one after the other; kinds not used yet in the session come first."""
    edits: list[Edit] = []
    for _ in range(turns):
        used = {e.kind for e in edits}
        fresh, seen = [k for k in EDITS if k not in used], [k for k in EDITS if k in used]
        rng.shuffle(fresh)
        rng.shuffle(seen)
        edit = next((e for e in (EDITS[k](source, rng) for k in fresh + seen) if e is not None), None)
        if edit is None:
            break
        edits.append(edit)
        source = edit.source
    return edits


# ---------------------------------------------------------------------------- the workload
def edit_prompt(excerpt: Excerpt, source: str, instruction: str) -> str:
    return f"Here is the Python file `{excerpt.relpath}`:\n\n```python\n{source}```\n\n{instruction}"


def edit_sessions(seed: int = 0) -> Iterator[list[Request]]:
    """Sessions without end: excerpts in an order shuffled by ``seed`` (cycling, with fresh edits, once used up)."""
    excerpts = list(heldout_excerpts())
    rng_for("agentic-edit", seed).shuffle(excerpts)
    index = misses = 0
    while excerpts and misses < len(excerpts):
        excerpt = excerpts[index % len(excerpts)]
        rng = rng_for("agentic-edit", seed, index)
        session = f"agentic-edit/s{seed}/{index:04d}/{excerpt.module}"
        source, requests = excerpt.text, []
        for turn, edit in enumerate(edit_session(source, rng.randint(3, 5), rng)):
            requests.append(Request(
                id=f"{session}/{turn}", workload="agentic-edit",
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": edit_prompt(excerpt, source, edit.instruction)}],
                session=session, turn=turn, reference=edit.source,
                max_tokens=token_budget(edit.source, 3.0, 64),
                meta={"source": "stdlib", "module": excerpt.module, "lines": [excerpt.first, excerpt.last],
                      "input": source, "edit": edit.kind, **edit.details}))
            source = edit.source
        index += 1
        misses = 0 if requests else misses + 1
        if requests:
            yield requests


def edit_workload(n: int | None = 120, seed: int = 0) -> list[Request]:
    """``n`` requests: sessions of 3-5 edits each, in order (the last session may be cut short)."""
    if n is None:
        n = 120
    return take((r for session in edit_sessions(seed) for r in session), n)

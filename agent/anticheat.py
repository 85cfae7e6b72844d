"""Checks that reject a candidate kernel that wins by cheating rather than by computing.

Static (``static_check``, on the source's AST, before anything runs):

* imports outside an allow-list (jax, its Pallas and lax modules, numpy, math, functools, typing...):
  this rejects importing the reference or the baseline (``agent``, ``specjax``, ``pallas_kernels``,
  jax's own Pallas ops), threads and processes, files, ``gc``/``inspect``/``ctypes``;
* builtins that reach around the rules (``open``, ``eval``, ``exec``, ``__import__``, ``globals``,
  ``setattr``...), dunder and frame attributes (``__globals__``, ``f_back``, ``tb_frame``...);
* state kept between calls: ``global``/``nonlocal``, module-level mutable containers, mutable default
  arguments, ``functools.cache``/``lru_cache``, assignments to attributes (``time.perf_counter = ...``,
  ``kernel.memo = ...``) and to subscripts of module-level names;
* special-cased shapes: a comparison between an input's shape (``x.shape``, ``x.ndim``, ``len(x)``,
  or a name unpacked from one) and an integer literal above 16 (small literals are tile-size
  arithmetic; a benchmark dimension such as 4096 is not).

Dynamic (``Guard``, inside the harness's worker while the candidate's code runs): an audit hook
refuses writes outside the work directory, reads of the repository (references, harness) and of
/proc, new processes, sockets, ``gc`` object walks, ``sys._current_frames`` and ctypes; after import and
the candidate's module imports through a guarded ``__import__`` that refuses the
reference, the baselines and process control (modules already loaded by the harness included); after
every call the guard checks that timers, ``jax.block_until_ready`` and the harness's functions
are the objects they were, that no thread the candidate started is still alive, and that the module's
globals are unchanged (state kept between calls). The harness adds what the candidate cannot know:
fresh random seeds and a fresh shape per run, the reference computed only after the candidate returns.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ALLOWED_IMPORTS = ("jax", "numpy", "math", "functools", "typing", "dataclasses", "__future__", "collections.abc")
# jax's own Pallas kernels are baselines; jax._src is where jax's internals could be rewired.
BANNED_PREFIXES = ("jax.experimental.pallas.ops", "jax._src", "jax.experimental.compilation_cache", "jax.profiler")
BANNED_CALLS = {"open", "eval", "exec", "compile", "__import__", "globals", "locals", "vars", "setattr",
                "delattr", "getattr", "breakpoint", "input", "memoryview"}
FRAME_ATTRIBUTES = {"f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "tb_next",
                    "gi_frame", "cr_frame", "ag_frame", "co_consts"}
CACHE_DECORATORS = {"cache", "lru_cache", "cached_property"}
SHAPE_ATTRIBUTES = {"shape", "ndim", "size"}
SMALL_LITERAL = 16


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _allowed(module: str) -> bool:
    return _under(module, ALLOWED_IMPORTS) and not _under(module, BANNED_PREFIXES)


def _mentions_shape(node: ast.AST, tainted: set[str]) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr in SHAPE_ATTRIBUTES:
            return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "len":
            return True
        if isinstance(sub, ast.Name) and sub.id in tainted:
            return True
    return False


def _big_int_literals(node: ast.AST) -> list[int]:
    return [sub.value for sub in ast.walk(node) if isinstance(sub, ast.Constant) and type(sub.value) is int
            and abs(sub.value) > SMALL_LITERAL]


def _shape_names(tree: ast.AST) -> set[str]:
    """Names bound (directly or by unpacking) from an expression that reads a shape: taint to a fixpoint."""
    tainted: set[str] = set()
    while True:
        before = len(tainted)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None \
                    and _mentions_shape(node.value, tainted):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    tainted |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        if len(tainted) == before:
            return tainted


def static_check(source: str, filename: str = "kernel.py") -> list[str]:
    """Reasons to reject ``source`` (empty: nothing found). Raises nothing on a syntax error: reports it."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as e:
        return [f"{filename}:{e.lineno}: syntax error: {e.msg}"]
    found: list[str] = []

    def flag(node: ast.AST, why: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {why}")

    module_names = {t.id for node in tree.body if isinstance(node, ast.Assign)
                    for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    tainted = _shape_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _allowed(alias.name):
                    flag(node, f"imports {alias.name!r}, which is not on the allow-list ({', '.join(ALLOWED_IMPORTS)})")
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if node.level or not _allowed(module) or not all(_allowed(f"{module}.{a.name}") for a in node.names):
                flag(node, f"imports from {module!r} something not on the allow-list ({', '.join(ALLOWED_IMPORTS)}; "
                           f"not {', '.join(BANNED_PREFIXES)})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
            flag(node, f"calls {node.func.id}()")
        elif isinstance(node, ast.Name) and node.id in BANNED_CALLS | {"__builtins__"}:
            flag(node, f"uses {node.id!r}")
        elif isinstance(node, ast.Attribute) and (node.attr.startswith("__") or node.attr in FRAME_ATTRIBUTES):
            flag(node, f"reaches into {node.attr!r}")
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            flag(node, "keeps state between calls (global/nonlocal)")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store):
                        flag(node, f"assigns an attribute ({ast.unparse(t)}): patching or hidden state")
                    if isinstance(t, ast.Subscript) and isinstance(t.ctx, ast.Store) and isinstance(t.value, ast.Name) \
                            and t.value.id in module_names:
                        flag(node, f"writes into module-level {t.value.id!r}: state kept between calls")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                if isinstance(default, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp, ast.Call)):
                    flag(default, "a mutable default argument keeps state between calls")
            for deco in getattr(node, "decorator_list", []):
                base = deco.func if isinstance(deco, ast.Call) else deco
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name in CACHE_DECORATORS:
                    flag(deco, f"caches results across calls (@{name})")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_mentions_shape(s, tainted) for s in sides):
                literals = [v for s in sides if not _mentions_shape(s, tainted) for v in _big_int_literals(s)]
                if literals:
                    flag(node, f"special-cases a shape: compares an input's shape with {literals}")
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Dict, ast.Set, ast.ListComp,
                                                                    ast.DictComp, ast.SetComp)):
            flag(node, "module-level mutable container: state kept between calls")
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name) \
                and node.value.func.id in {"list", "dict", "set", "bytearray"}:
            flag(node, "module-level mutable container: state kept between calls")
    return found


BLOCKED_EVENTS = {
    "subprocess.Popen": "starts a process", "os.system": "starts a process", "os.fork": "starts a process",
    "os.forkpty": "starts a process", "os.posix_spawn": "starts a process", "os.exec": "starts a process",
    "os.spawn": "starts a process", "pty.spawn": "starts a process", "os.kill": "signals a process",
    "socket.connect": "opens a network connection", "socket.bind": "opens a socket",
    "gc.get_objects": "walks the heap (harness internals)", "gc.get_referrers": "walks the heap (harness internals)",
    "gc.get_referents": "walks the heap (harness internals)",
    "sys._current_frames": "reads other frames (harness internals)", "ctypes.dlopen": "loads native code",
    "ctypes.dlsym": "loads native code", "ctypes.addressof": "reads raw memory", "os.chdir": "leaves its work directory",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Violation(RuntimeError):
    """A candidate broke a rule; raised into its code where the operation is refused."""


class Guard:
    """The worker's dynamic checks. ``active()`` brackets the candidate's code (import and calls);
    ``after_call(module)`` runs the between-call checks; ``violations`` lists everything caught."""

    def __init__(self, workdir: Path, forbidden_reads: list[Path], watched: dict[str, object]):
        self.workdir = workdir.resolve()
        self.forbidden_reads = [p.resolve() for p in forbidden_reads]
        self.watched = dict(watched)  # "module.attr" -> the object it must still be
        self.violations: list[str] = []
        self._on = False
        self._threads: set[threading.Thread] = set()
        self._globals: dict[str, object] | None = None
        sys.addaudithook(self._hook)  # cannot be removed: the candidate cannot unhook it either

    def _refuse(self, why: str) -> None:
        self.violations.append(why)
        raise Violation(why)

    def _hook(self, event: str, args: tuple) -> None:
        if not self._on:
            return
        if event in BLOCKED_EVENTS:
            self._refuse(f"{BLOCKED_EVENTS[event]} ({event})")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = Path(os.fsdecode(args[0]))
            path = (path if path.is_absolute() else Path.cwd() / path).resolve()
            mode, flags = args[1] or "r", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or bool(flags & WRITE_FLAGS)
            if writes and not _inside(path, self.workdir):
                self._refuse(f"writes outside its work directory ({path})")
            if not writes and (any(_inside(path, root) for root in self.forbidden_reads)
                               or _inside(path, Path("/proc"))) and not _inside(path, self.workdir):
                self._refuse(f"reads {path} (references, harness internals or other processes)")

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        before = set(threading.enumerate())
        self._on = True
        try:
            yield
        finally:
            self._on = False
            self._threads |= set(threading.enumerate()) - before

    def builtins(self) -> dict:
        """Builtins for the candidate's module whose ``__import__`` refuses what the static check bans."""
        import builtins

        real_import = builtins.__import__

        def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
            targets = [name] + [f"{name}.{item}" for item in fromlist or ()]
            if level or any(_under(t, ("agent", "specjax", "pallas_kernels", "gc", "ctypes", "subprocess",
                                       "threading", "multiprocessing")) or _under(t, BANNED_PREFIXES)
                            for t in targets):
                self._refuse(f"imports {name!r} (reference, baseline, harness or process control)")
            return real_import(name, globals, locals, fromlist, level)

        return {**vars(builtins), "__import__": guarded_import}

    def after_call(self, module) -> None:
        """Between-call checks: patched objects, live threads, changed module globals."""
        for name, obj in self.watched.items():
            owner, attr = name.rsplit(".", 1)
            if getattr(sys.modules[owner], attr, None) is not obj:
                self.violations.append(f"patched {name}")
        alive = [t for t in self._threads if t.is_alive()]
        if alive:
            self.violations.append(f"left {len(alive)} thread(s) running after the call")
        snapshot = {k: (id(v), _fingerprint(v)) for k, v in vars(module).items() if not k.startswith("__")}
        if self._globals is not None and snapshot != self._globals:
            changed = sorted(k for k in snapshot.keys() | self._globals.keys()
                             if snapshot.get(k) != self._globals.get(k))
            self.violations.append(f"module globals changed between calls ({', '.join(changed)}): state kept")
        self._globals = snapshot


def _fingerprint(value) -> object:
    """What a mutable value holds, cheaply: containers by length and the ids of their items."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, len(value), tuple(sorted(id(v) for v in value)))
    if isinstance(value, dict):
        return ("dict", len(value), tuple(sorted((repr(k), id(v)) for k, v in value.items())))
    return None


def watched_objects() -> dict[str, object]:
    """Timers and the synchronisation the harness's timing and checks rely on."""
    import jax
    import numpy as np

    names = {"time.perf_counter": time.perf_counter, "time.perf_counter_ns": time.perf_counter_ns,
             "time.time": time.time, "time.monotonic": time.monotonic, "jax.block_until_ready": jax.block_until_ready,
             "jax.jit": jax.jit, "numpy.asarray": np.asarray, "threading.Thread": threading.Thread}
    from agent import compare

    names.update({f"agent.compare.{n}": getattr(compare, n) for n in ("error_ratio", "leaves")})
    return names

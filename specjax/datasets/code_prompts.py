"""How a documented function becomes a "write this function" request.

One wording for the ``code`` workload (held-out modules) and for the draft's training prompts (the
rest), so that training practises the phrasing the benchmark asks in, on other functions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DocumentedFunction:
    """A function to ask for: where it lives, how it is called, what its docstring says it does."""

    module: str
    name: str  # "quote", or "Class.method" for a method
    signature: str  # "a, b=1, *args" plus " -> T" when annotated
    sentence: str  # the docstring's first sentence
    source: str  # the implementation, decorators included (a method keeps its indentation)
    is_async: bool

    @property
    def is_method(self) -> bool:
        return "." in self.name


def first_sentence(docstring: str) -> str | None:
    """The docstring's first sentence on one line, or None when it does not read as a description."""
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z(`\"'])", paragraph, maxsplit=1)[0].strip()
    if not 12 <= len(sentence) <= 250 or ">>>" in sentence or not sentence[0].isupper():
        return None
    if re.match(r"^[\w.]+\(.*\)\s*(->|$)", sentence):  # a signature line, not prose
        return None
    return sentence if sentence[-1] in ".!?" else sentence + "."


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

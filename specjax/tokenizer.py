"""Text <-> token ids: a thin layer over Hugging Face ``tokenizers``, plus chat templates and streaming.

Two sources build the same :class:`Tokenizer`:

* an HF model directory (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``,
  ``generation_config.json``), and
* GGUF metadata (``tokenizer.ggml.*``), from which a byte-level BPE is rebuilt with the pre-tokenizer
  llama.cpp uses for that vocabulary (``tokenizer.ggml.pre``).

Chat templates are rendered in a sandboxed jinja2 environment configured like transformers'
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``), so prompts match token for token.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from specjax.params import CheckpointError, read_json_object


class TokenizerError(CheckpointError):
    """A tokenizer that is missing, corrupt, or of a kind specjax cannot build."""


# llama.cpp token types (``tokenizer.ggml.token_type``).
_CONTROL, _USER_DEFINED = 3, 4

# Split patterns for `tokenizer.ggml.pre`, as in the original tokenizer.json files: Llama-3 groups up to
# three digits, Qwen2 isolates each digit; both keep letters with one leading non-letter.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_pre():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre():
    # SmolLM/StarCoder: every digit on its own, then the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), _gpt2_pre()])


def _split_pre(pattern: str):
    def build():
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return build


# `tokenizer.ggml.pre` -> (pre-tokenizer builder, BPE ignore_merges). Llama-3 vocabularies look whole
# words up before merging (their tokenizer.json sets ignore_merges); the others always merge.
_GGUF_PRE_TOKENIZERS = {
    "smollm": (_digits_then_gpt2_pre, False),
    "starcoder": (_digits_then_gpt2_pre, False),
    "llama-bpe": (_split_pre(_LLAMA3_SPLIT), True),
    "llama3": (_split_pre(_LLAMA3_SPLIT), True),
    "llama-v3": (_split_pre(_LLAMA3_SPLIT), True),
    "qwen2": (_split_pre(_QWEN2_SPLIT), False),
    "gpt-2": (_gpt2_pre, False),
    "gpt2": (_gpt2_pre, False),
    "default": (_gpt2_pre, False),
}


def check_unicode(text: str) -> None:
    """Refuse text no UTF-8 can hold: a lone surrogate (JSON's ``"\\ud800"`` decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                         f"character {e.start}") from None


class Tokenizer:
    """Encodes and decodes text, renders chat templates, and knows the special token ids.

    Attributes: ``bos_token_id`` (int | None), ``eos_token_ids`` (tuple of ids that end generation),
    ``chat_template`` (jinja source or None), ``add_bos`` (whether ``encode`` prepends BOS when
    ``add_special_tokens=True``; decided by the backend's post-processor), ``vocab_size``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), chat_template: str | None = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for name, ids in (("bos_token_id", [] if bos_token_id is None else [bos_token_id]),
                          ("eos_token_ids", eos_token_ids)):
            for i in ids:
                if not 0 <= int(i) < self.vocab_size:
                    raise TokenizerError(f"{name} {i} is outside the vocabulary (size {self.vocab_size})")
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))  # dedupe, keep order
        self.chat_template = chat_template
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, add_bos={self.add_bos})")

    # ------------------------------------------------------------------ ids <-> text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) map to their ids;
        ``add_special_tokens`` only controls the BOS/EOS the tokenizer adds around the text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        check_unicode(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text any one token covers (an upper bound: the longest token's
        own string, in which byte-level vocabularies spend a character per byte)."""
        return max((len(token) for token in self.backend.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """The primary end token's text (the first of ``eos_token_ids``), as chat templates see it."""
        return self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Yield text chunks as ``ids`` arrive; ``"".join(chunks) == decode(all ids)``."""
        stream = self.incremental_decoder(skip_special_tokens)
        for token_id in ids:
            if chunk := stream.add(token_id):
                yield chunk
        if chunk := stream.flush():
            yield chunk

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """Render ``messages`` (a list of ``{"role", "content"}`` dicts) into a prompt string.

        To get token ids use :meth:`encode_chat`, which keeps special-token text in the messages
        from becoming control tokens; encoding this string yourself does not. The template writes
        BOS itself when the model wants one. Extra keyword arguments (``tools=...``) are passed to
        the template.
        """
        validate_messages(messages)
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; format the prompt yourself")
        try:
            return self._compiled_template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **template_kwargs)
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception(), or content it cannot handle
            raise ValueError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
                    before_encoding: Callable[[str], None] | None = None, **template_kwargs) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids, with special-token text in the messages encoded as
        plain text: a user who writes ``<|im_end|>`` in a message gets the characters, never the
        control token, so no message can end its turn or open another role's. The template's own
        special tokens stay control tokens. Ordinary messages give exactly ``encode(text,
        add_special_tokens=False)``.

        Special-token strings in the messages' string values (content, text parts, tool-call
        arguments; roles are the template's to check) are swapped for unforgeable markers before
        rendering, so the template's own transforms (trim, split) still apply. The rendered text is
        then split at the template's special tokens, and each stretch between them encoded with
        special-token parsing off, markers restored. ``before_encoding`` sees the rendered text
        before it is tokenised (to refuse an overlong prompt without tokenising it).
        """
        validate_messages(messages)
        pattern = self._special_pattern
        found: list[str] = []
        nonce = secrets.token_hex(8)

        def shield(value):
            if isinstance(value, str):
                def mark(match):
                    found.append(match.group(0))
                    return f"\ue000{nonce}:{len(found) - 1}\ue001"
                return pattern.sub(mark, value) if pattern else value
            if isinstance(value, Mapping):
                return {k: v if k == "role" else shield(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [shield(v) for v in value]
            return value

        text = self.apply_chat_template([shield(m) for m in messages], add_generation_prompt, **template_kwargs)
        marker = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
        restore = lambda span: marker.sub(lambda m: found[int(m.group(1))], span)  # noqa: E731
        rendered = restore(text) if found else text
        if before_encoding is not None:
            before_encoding(rendered)
        if not found:
            return text, self.encode(text, add_special_tokens=False)
        check_unicode(text)  # the literal backend is called directly, past encode's check
        ids: list[int] = []
        for i, piece in enumerate(pattern.split(text)):  # odd pieces: the template's special tokens
            if i % 2:
                ids.append(self.backend.token_to_id(piece))
            elif piece:
                ids += self._literal_backend.encode(restore(piece), add_special_tokens=False).ids
        return rendered, ids

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """Any special token's text, longest first, as one capturing regex (None when there are none)."""
        specials = sorted({t.content for t in self.backend.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @cached_property
    def _literal_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token text as ordinary text (a copy: the flag
        is the tokenizer's own state, and the backend is shared across threads)."""
        literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
        literal.encode_special_tokens = True
        return literal

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        try:
            return _chat_environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template does not parse (line {e.lineno}): {e.message}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        """From an HF model directory: ``tokenizer.json`` (required), ``tokenizer_config.json``,
        ``chat_template.jinja`` (preferred over the config's template) and ``generation_config.json``
        (its ``eos_token_id`` list adds end tokens, such as Llama-3's ``<|eot_id|>``)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {directory}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exception on malformed files
            raise TokenizerError(f"{path} is not a valid tokenizer file: {e}") from None
        config = read_json_object(directory / "tokenizer_config.json", TokenizerError, missing_ok=True)
        generation = read_json_object(directory / "generation_config.json", TokenizerError, missing_ok=True)

        def token_id(value) -> int | None:
            text = value.get("content") if isinstance(value, Mapping) else value
            return None if text is None else backend.token_to_id(str(text))

        bos = token_id(config.get("bos_token"))
        if bos is None and isinstance(generation.get("bos_token_id"), int):
            bos = generation["bos_token_id"]
        eos = [token_id(config.get("eos_token"))]
        gen_eos = generation.get("eos_token_id")
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos]
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        return cls(backend, bos_token_id=bos, eos_token_ids=[int(i) for i in eos if isinstance(i, int)],
                   chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes (``tokenizer.ggml.model == "gpt2"``: byte-level BPE).

        ``meta`` maps GGUF keys to Python values (arrays as lists). Tokens typed CONTROL become special
        tokens and USER_DEFINED ones plain added tokens, so both are matched whole in the input text.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind == "llama":
            raise TokenizerError("GGUF sentencepiece tokenizers (tokenizer.ggml.model 'llama') are not supported; "
                                 "specjax builds byte-level BPE ('gpt2') tokenizers")
        if kind != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r}; specjax supports 'gpt2' (byte-level BPE)")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}; "
                                 f"supported: {', '.join(_GGUF_PRE_TOKENIZERS)}")
        make_pre, ignore_merges = _GGUF_PRE_TOKENIZERS[pre]

        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TokenizerError(f"malformed GGUF merge {merge!r} (expected 'left right')")
            pairs.append((left, right))
        vocab = {token: i for i, token in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        backend.pre_tokenizer = make_pre()
        backend.decoder = decoders.ByteLevel()

        types = meta.get("tokenizer.ggml.token_type") or ()
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t == _CONTROL])
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                            for i, t in enumerate(types) if t == _USER_DEFINED])

        bos = meta.get("tokenizer.ggml.bos_token_id")
        if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
                special_tokens=[(tokens[bos], int(bos))])
        # end-of-turn / end-of-message ids end generation too (Llama-3 instruct files set eot).
        eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return cls(backend, bos_token_id=bos, eos_token_ids=[int(i) for i in eos if i is not None],
                   chat_template=meta.get("tokenizer.chat_template"))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer in HF layout (tokenizer.json, tokenizer_config.json, generation_config.json)
        so :meth:`from_hf_dir` restores it exactly."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")


class IncrementalDecoder:
    """Streams token ids to text without ever emitting a partial UTF-8 character.

    A byte-level token can end inside a multi-byte character; decoding then yields U+FFFD, and the
    text is held back until a later token completes it. Each step re-decodes only a short window
    (the ids of the last emitted chunk plus the new ones), so text that depends on the preceding
    token (sentencepiece's leading space) comes out as in a full decode, at O(window) cost per token.
    ``tokenizers.decoders.DecodeStream`` emits the same chunks but cannot flush: text ending inside a
    character would lose it, where ``flush`` returns what ``decode`` would (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._window_start = 0  # first id of the re-decoded window
        self._emitted = 0  # ids[:_emitted] have been turned into text

    def _window_text(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        done = decode(self._ids[self._window_start:self._emitted], self._skip)
        return done, decode(self._ids[self._window_start:], self._skip)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Feed one id (or several); return the newly completed text, possibly ``""``."""
        self._ids.extend([int(token_ids)] if isinstance(token_ids, int) else map(int, token_ids))
        done, full = self._window_text()
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return ""
        self._window_start, self._emitted = self._emitted, len(self._ids)
        return full[len(done):]

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        done, full = self._window_text()
        self._window_start = self._emitted = len(self._ids)
        return full[len(done):]


# ---------------------------------------------------------------------------- chat helpers
def validate_messages(messages: Any) -> None:
    """Raise ValueError unless ``messages`` is a non-empty list of ``{"role": str, "content": ...}`` dicts."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] needs a non-empty string 'role', got {role!r}")
        if "content" not in message:
            raise ValueError(f"messages[{i}] (role {role!r}) has no 'content'")
        content = message["content"]
        # a list is multimodal/structured content; None is allowed for assistant tool calls
        if not (isinstance(content, (str, list)) or (content is None and "tool_calls" in message)):
            raise ValueError(f"messages[{i}] content must be a string, got {type(content).__name__}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env

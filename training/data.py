"""Training text for draft models, as fixed-length token windows.

Sources, all from the training side of ``specjax.datasets.splits`` (never a held-out record), read
by the ``specjax.datasets`` modules the benchmark workloads read their held-out side with:

* stdlib text: source (code and docstrings) of the Python standard library's non-held-out modules,
  ``specjax.datasets.stdlib.stdlib_training_texts()``;
* ShareGPT conversations: ``specjax.datasets.sharegpt.sharegpt_conversations(split="train")`` with an
  English first turn, rendered with the target's chat template;
* the target's own continuations of training prompts (:func:`generate_continuations`), produced
  once and stored as token arrays.

Documents are cut into pieces of at most ``max_doc_tokens``, shuffled by seed, joined with
``<|endoftext|>`` and cut into windows of ``seq_len`` tokens; :func:`batch_rows` then draws batches in a per-epoch
permutation that depends only on (seed, step), so a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from specjax.datasets import sharegpt, stdlib
from specjax.datasets.code_prompts import DocumentedFunction, code_prompt, first_sentence

SEQ_LEN = 256
DOC_SEPARATOR = "<|endoftext|>"

# ---------------------------------------------------------------------------- raw text
def stdlib_texts() -> tuple[list[str], str]:
    """Training-side stdlib texts, and where they came from (for the run's manifest)."""
    return list(stdlib.stdlib_training_texts()), "specjax.datasets.stdlib.stdlib_training_texts"


def sharegpt_conversations() -> tuple[list[list[dict]], str]:
    """Training-side ShareGPT conversations (lists of {"role", "content"}), and where they came from."""
    conversations = [normalize_messages(c) for c in sharegpt.sharegpt_conversations(split="train")]
    # The target is an English model and the chat workload keeps English prompts: so does training.
    english = [c for c in conversations if c and sharegpt.looks_english(c[0]["content"])]
    return english, "specjax.datasets.sharegpt (English-looking first turns)"


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "bing": "assistant", "system": "system"}


def normalize_messages(conversation: Iterable[Any]) -> list[dict]:
    """Messages as {"role": user|assistant|system, "content": str}; ShareGPT's from/value accepted."""
    out = []
    for m in conversation:
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _ROLES.get(str(role).lower())
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """A whole conversation as the target sees it (its chat template, no generation prompt)."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=False)


# ---------------------------------------------------------------------------- windows
def pack_windows(token_docs: Iterable[Sequence[int]], seq_len: int, separator_id: int) -> np.ndarray:
    """Join documents (separator after each) and cut into [num_windows, seq_len] int32; drops the tail."""
    flat: list[np.ndarray] = []
    sep = np.array([separator_id], np.int32)
    for doc in token_docs:
        flat += [np.asarray(doc, np.int32), sep]
    stream = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    n = stream.size // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def sample_documents(texts: Sequence[str], tokenizer, token_budget: int, seed: int,
                     max_doc_tokens: int = 1024, batch: int = 256) -> list[np.ndarray]:
    """Tokenize ``texts``, cut each into pieces of at most ``max_doc_tokens`` (so one long file is
    spread over the run instead of filling consecutive batches), shuffle the pieces by seed and keep
    them until ``token_budget`` tokens (separators counted)."""
    pieces = []
    for start in range(0, len(texts), batch):
        for enc in tokenizer.backend.encode_batch(list(texts[start:start + batch]), add_special_tokens=False):
            ids = np.asarray(enc.ids, np.int32)
            pieces += [ids[i:i + max_doc_tokens] for i in range(0, ids.size, max_doc_tokens)]
    docs, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(pieces)):
        if total >= token_budget:
            break
        docs.append(pieces[i])
        total += pieces[i].size + 1
    return docs


@dataclass
class TextMix:
    """Which sources make up a token budget: ``chat_fraction`` of it from ShareGPT when available."""

    token_budget: int
    chat_fraction: float = 0.5
    seq_len: int = SEQ_LEN
    seed: int = 0
    max_doc_tokens: int = 1024


def build_text_windows(tokenizer, mix: TextMix, stdlib: Sequence[str] | None = None,
                       chats: Sequence[Sequence[dict]] | None = None) -> tuple[np.ndarray, dict]:
    """Token windows [N, seq_len] for ``mix`` and a manifest saying what went in.

    ``stdlib``/``chats`` override the default sources (tests pass their own text).
    """
    manifest: dict[str, Any] = {"seq_len": mix.seq_len, "seed": mix.seed, "token_budget": mix.token_budget}
    if stdlib is None:
        stdlib, manifest["stdlib_source"] = stdlib_texts()
    if chats is None:
        chats, manifest["chat_source"] = sharegpt_conversations()
    chats = [c for c in chats if c]
    chat_budget = int(mix.token_budget * mix.chat_fraction) if chats else 0
    chat_docs = []
    if chat_budget:
        chat_texts = [render_chat(tokenizer, c) for c in chats]
        chat_docs = sample_documents(chat_texts, tokenizer, chat_budget, mix.seed + 1, mix.max_doc_tokens)
    code_docs = sample_documents(list(stdlib), tokenizer, mix.token_budget - sum(d.size + 1 for d in chat_docs),
                                 mix.seed, mix.max_doc_tokens)
    docs = code_docs + chat_docs
    order = np.random.default_rng(mix.seed + 2).permutation(len(docs))
    sep = tokenizer.token_to_id(DOC_SEPARATOR)
    windows = pack_windows([docs[i] for i in order], mix.seq_len, 0 if sep is None else sep)
    manifest.update(stdlib_docs=len(code_docs), stdlib_tokens=int(sum(d.size for d in code_docs)),
                    chat_docs=len(chat_docs), chat_tokens=int(sum(d.size for d in chat_docs)),
                    windows=int(windows.shape[0]))
    return windows, manifest


def batch_rows(num_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Row indices of training step ``step``: epoch-wise permutations of the rows, seeded by
    (seed, epoch), so the batch of any step is known without replaying earlier ones."""
    if num_rows < batch_size:
        raise ValueError(f"{num_rows} rows cannot fill a batch of {batch_size}")
    steps_per_epoch = num_rows // batch_size
    epoch, index = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return np.sort(perm[index * batch_size:(index + 1) * batch_size])


# ---------------------------------------------------------------------------- prompts and generations
def code_prompts(limit: int, seed: int) -> list[list[dict]]:
    """"Write a function" chat prompts from documented public functions of non-held-out stdlib modules:
    the training-side twin of the ``code`` workload, in its wording."""
    found = [(module.name, f) for module in _prompt_modules() for f in _documented_functions(module.tree())]
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(found))[:limit]:
        module, (name, args, doc) = found[i]
        sentence = first_sentence(doc)
        if sentence:
            text = code_prompt(DocumentedFunction(module, name, args, sentence, "", False), int(rng.integers(2)))
        else:
            text = f"Write a Python function `{name}({args})` that does the following (like `{module}.{name}`):\n\n{doc}"
        out.append([{"role": "user", "content": text}])
    return out


# Stdlib modules whose functions are not code worth asking for (generated tables, test data, GUIs).
_SKIP_MODULES = {"antigravity", "this", "idlelib", "lib2to3", "test", "tkinter", "turtledemo", "ensurepip",
                 "pydoc_data", "unicodedata", "encodings"}


def _prompt_modules() -> list[stdlib.StdlibModule]:
    """Training-side top-level single-file modules whose functions are worth asking for."""
    return [m for m in stdlib.stdlib_split("train") if "." not in m.name and m.path.name != "__init__.py"
            and not m.name.startswith("_") and m.name not in _SKIP_MODULES]


def _documented_functions(tree: ast.Module | None) -> list[tuple[str, str, str]]:
    """(name, argument text, first docstring paragraph) of top-level public functions in ``tree``."""
    out = []
    for node in tree.body if tree is not None else ():
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                args = ast.unparse(node.args)
                out.append((node.name, args, inspect.cleandoc(doc).split("\n\n")[0]))
    return out


def chat_prompts(conversations: Sequence[Sequence[dict]], limit: int, seed: int, max_chars: int = 2000
                 ) -> list[list[dict]]:
    """Single-turn prompts: the first user message of training conversations."""
    firsts = []
    for conv in conversations:
        for m in conv:
            if m["role"] == "user":
                if len(m["content"]) <= max_chars:
                    firsts.append([{"role": "user", "content": m["content"]}])
                break
    order = np.random.default_rng(seed).permutation(len(firsts))
    return [firsts[i] for i in order[:limit]]


def generate_continuations(llm, prompts: Sequence[Any], out_dir: str | os.PathLike, *, max_tokens: int = 192,
                           temperature: float = 0.0, chunk: int = 16, seed: int = 0, progress=None) -> list[np.ndarray]:
    """The target's answers to ``prompts``, as prompt+answer token arrays, generated once.

    Work is done in chunks of ``chunk`` prompts, each saved as ``out_dir/gen_XXXXX.npz`` (token
    arrays concatenated, with offsets), so an interrupted run resumes at the first missing chunk.
    ``llm``: a ``specjax.LLM`` for the target (or a zero-argument callable returning one, called only
    if something is left to generate).
    """
    from specjax import SamplingParams

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[np.ndarray] = []
    for index, start in enumerate(range(0, len(prompts), chunk)):
        path = out_dir / f"gen_{index:05d}.npz"
        if not path.is_file():
            if callable(llm) and not hasattr(llm, "generate"):
                llm = llm()
            params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + start + i)
                      for i in range(len(prompts[start:start + chunk]))]
            outputs = llm.generate(list(prompts[start:start + chunk]), params)
            seqs = [np.asarray(o.prompt_token_ids + o.token_ids, np.int32) for o in outputs]
            offsets = np.cumsum([0] + [s.size for s in seqs])
            tmp = out_dir / f".gen_{index:05d}.tmp.npz"
            np.savez(tmp, tokens=np.concatenate(seqs), offsets=offsets)
            os.replace(tmp, path)
        with np.load(path) as f:
            tokens, offsets = f["tokens"], f["offsets"]
        results += [tokens[offsets[i]:offsets[i + 1]] for i in range(offsets.size - 1)]
        if progress is not None:
            progress(len(results), len(prompts))
    return results


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (a resumed run never reads half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_log(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The training log by step; a step logged twice (redone after a resume) keeps its last entry."""
    entries = {}
    path = run_dir / "train_log.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[entry["step"]] = entry
    return entries

"""The shared corpora: ShareGPT read as a stream up to its broken tail, the English filter, the code prompts' wording."""

import io
import json

from specjax.datasets import code_prompts, sharegpt
from specjax.datasets.splits import is_heldout


# ---------------------------------------------------------------------------- the ShareGPT file
def _record(i: int, text: str) -> dict:
    return {"id": f"conv{i}_0", "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "ok"}]}


def test_truncated_json_array_yields_complete_records(tmp_path):
    records = [_record(i, f"question {i} — naïve café ✓") for i in range(3)]
    complete = json.dumps(records, ensure_ascii=False, indent=2).encode()
    cut = complete.index("✓".encode(), complete.index(b"conv2")) + 1  # inside the last record and a UTF-8 character
    for chunk in (5, 64, 1 << 20):  # records straddle many refills, or none
        assert list(sharegpt.iter_json_array(io.BytesIO(complete), chunk)) == records
        assert list(sharegpt.iter_json_array(io.BytesIO(complete[:cut]), chunk)) == records[:2]
        assert list(sharegpt.iter_json_array(io.BytesIO(complete[:-2]), chunk)) == records  # no closing bracket
    assert list(sharegpt.iter_json_array(io.BytesIO(b""))) == []
    assert list(sharegpt.iter_json_array(io.BytesIO(b"[\n  "))) == []

    path = tmp_path / "truncated.json"
    duplicate = {"id": "conv0_0", "conversations": [{"from": "human", "value": "a repeated id"}]}
    text = json.dumps(records + [duplicate, _record(9, "x" * 100)], ensure_ascii=False)
    path.write_bytes(text.encode()[:-40])
    got = list(sharegpt.sharegpt_records(None, path))
    assert [cid for cid, _ in got] == ["conv0_0", "conv1_0", "conv2_0"]
    assert got[0][1] == [{"role": "user", "content": records[0]["conversations"][0]["value"]},
                         {"role": "assistant", "content": "ok"}]
    train = [cid for cid, _ in sharegpt.sharegpt_records("train", path)]
    heldout = [cid for cid, _ in sharegpt.sharegpt_records("heldout", path)]
    assert sorted(train + heldout) == ["conv0_0", "conv1_0", "conv2_0"]
    assert all(is_heldout("sharegpt", sharegpt.conversation_key(cid)) for cid in heldout)


def test_conversation_key_keeps_chunks_together():
    assert sharegpt.conversation_key("QWJhYvA_12") == "QWJhYvA" == sharegpt.conversation_key("QWJhYvA_0")
    assert sharegpt.conversation_key("plain") == "plain"


def test_english_filter():
    assert sharegpt.looks_english("How do I write a function that sorts a list in Python?")
    assert not sharegpt.looks_english("¿Cómo puedo escribir una función que ordene una lista?")
    assert not sharegpt.looks_english("如何编写一个对列表进行排序的函数？请给出示例代码。")


# ---------------------------------------------------------------------------- code prompts
def test_code_prompt_wording():
    assert code_prompts.describe("Return the sum of a and b.") == "returns the sum of a and b"
    assert code_prompts.describe("Creates a folder and return it.") == "creates a folder and returns it"
    assert code_prompts.describe("Same as a + b.") == "computes the same as a + b"
    assert code_prompts.describe("A decorator for caches.") is None
    assert code_prompts.first_sentence("Split the string.  More text follows.\n\nDetails.") == "Split the string."

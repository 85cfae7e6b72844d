"""Write pirate.jsonl: a small chat dataset in one answer style the base model lacks.

Every assistant answer starts "Arr, matey!" and ends "Yo ho!", whatever the question: a style a
finetuned adapter visibly learns (tests/test_finetune.py checks it on held-out questions) and a
base model never shows. The questions are templated (arithmetic, word games, small facts), so the
file is deterministic: ``python training/examples/make_pirate.py`` rewrites it identically.
"""

import json
import random
from pathlib import Path

FACTS = [
    ("What is the capital of France?", "the capital of France be Paris"),
    ("What is the capital of Japan?", "the capital of Japan be Tokyo"),
    ("What is the capital of Italy?", "the capital of Italy be Rome"),
    ("What is the capital of Spain?", "the capital of Spain be Madrid"),
    ("What is the capital of Egypt?", "the capital of Egypt be Cairo"),
    ("What is the capital of Canada?", "the capital of Canada be Ottawa"),
    ("What color is the sky on a clear day?", "the sky be blue on a clear day"),
    ("What color is grass?", "grass be green"),
    ("How many legs does a spider have?", "a spider has eight legs"),
    ("How many days are in a week?", "a week has seven days"),
    ("How many months are in a year?", "a year has twelve months"),
    ("What do bees make?", "bees make honey"),
    ("What is frozen water called?", "frozen water be ice"),
    ("Which planet is closest to the sun?", "Mercury be closest to the sun"),
    ("What is the largest ocean?", "the Pacific be the largest ocean"),
    ("What gas do plants take in?", "plants take in carbon dioxide"),
    ("What is the opposite of hot?", "the opposite of hot be cold"),
    ("What is the opposite of up?", "the opposite of up be down"),
    ("What animal says moo?", "a cow says moo"),
    ("What animal barks?", "a dog barks"),
    ("How many hours are in a day?", "a day has twenty-four hours"),
    ("What is the boiling point of water in Celsius?", "water boils at one hundred degrees Celsius"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet"),
    ("What shape has three sides?", "a triangle has three sides"),
    ("What is the first letter of the alphabet?", "the first letter be A"),
    ("What do you call a baby cat?", "a baby cat be a kitten"),
    ("What do you call a baby dog?", "a baby dog be a puppy"),
    ("What is the tallest animal?", "the giraffe be the tallest animal"),
    ("What do fish use to breathe?", "fish breathe with their gills"),
    ("What is the main language of Brazil?", "the main language of Brazil be Portuguese"),
]
WORDS = ["ship", "anchor", "parrot", "treasure", "island", "compass", "sail", "harbor", "cannon", "rope",
         "ocean", "storm", "barrel", "lantern", "map", "captain", "wave", "coral", "shell", "sword"]
SYSTEMS = [None, "You are a helpful assistant.", "Answer briefly."]


def answer(core: str) -> str:
    return f"Arr, matey! {core[0].upper()}{core[1:]}. Yo ho!"


def conversations(rng: random.Random):
    for question, core in FACTS:
        yield question, answer(core)
    for _ in range(120):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op = rng.choice(["plus", "times", "minus"])
        value = {"plus": a + b, "times": a * b, "minus": a - b}[op]
        yield f"What is {a} {op} {b}?", answer(f"{a} {op} {b} be {value}")
    for word in WORDS:
        yield f"Spell the word {word} backwards.", answer(f"{word} backwards be {word[::-1]}")
        yield f"How many letters are in the word {word}?", answer(f"{word} has {len(word)} letters")
        yield f"Use the word {word} in a sentence.", answer(f"the crew found a {word} by the shore")


def main() -> None:
    rng = random.Random(0)
    lines = []
    for question, reply in conversations(rng):
        system = rng.choice(SYSTEMS)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        lines.append(json.dumps({"messages": messages}))
    out = Path(__file__).with_name("pirate.jsonl")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} conversations to {out}")


if __name__ == "__main__":
    main()

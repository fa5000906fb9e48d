"""Synthetic long-context retrieval tasks (SPEC section 6), as byte-token examples.

- passkey (smoke test): a 5-digit number hidden at a depth in repeated filler text; the
  prompt ends with "The pass key is " and the answer is the number.
- kv-retrieval (discriminating): the context is many records ``key=value;`` (4-letter
  keys, all distinct; 4-digit values); the prompt ends with ``?key=`` naming the record at
  the given depth, and the answer is its value.

Each example is (prompt ids, answer ids), with len(prompt) + len(answer) == length.
Depth 0 puts the needle at the start of the context, depth 1 at its end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .tokenizer import encode as _encode

TASKS = ("passkey", "kv-retrieval")
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
KEY_LETTERS = "abcdefghijklmnopqrstuvwxyz"
VALUE_DIGITS = "0123456789"
KEY_LEN = VALUE_LEN = 4
RECORD_LEN = KEY_LEN + 1 + VALUE_LEN + 1  # "abcd=1234;"


@dataclass
class Example:
    prompt: list[int]
    answer: list[int]
    depth: float  # where the needle actually is, as a fraction of the context


def encode(text: str) -> list[int]:
    return _encode(text).tolist()


def _check(length: int, depth: float, minimum: int) -> None:
    if length < minimum:
        raise ValueError(f"the context length must be >= {minimum} tokens, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def passkey(length: int, depth: float, rng: random.Random) -> Example:
    key = f"{rng.randrange(10**4, 10**5)}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is "
    _check(length, depth, len(needle) + len(question) + len(key) + 1)
    room = length - len(needle) - len(question) - len(key)
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    cut = round(depth * room)
    text = filler[:cut] + needle + filler[cut:] + question
    return Example(encode(text), encode(key), cut / max(room, 1))


def kv_records(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n records with distinct random keys."""
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(KEY_LETTERS) for _ in range(KEY_LEN)))
    ordered = sorted(keys)
    rng.shuffle(ordered)
    return [(k, "".join(rng.choice(VALUE_DIGITS) for _ in range(VALUE_LEN))) for k in ordered]


def kv_retrieval(length: int, depth: float, rng: random.Random) -> Example:
    question_len = 1 + KEY_LEN + 1  # "?abcd="
    _check(length, depth, RECORD_LEN + question_len + VALUE_LEN)
    room = length - question_len - VALUE_LEN
    n = room // RECORD_LEN
    pad = room - n * RECORD_LEN  # leading spaces so that the total length is exact
    records = kv_records(n, rng)
    target = round(depth * (n - 1))
    key, value = records[target]
    text = " " * pad + "".join(f"{k}={v};" for k, v in records) + f"?{key}="
    return Example(encode(text), encode(value), target / max(n - 1, 1))


def make_example(task: str, length: int, depth: float, rng: random.Random) -> Example:
    if task == "passkey":
        return passkey(length, depth, rng)
    if task == "kv-retrieval":
        return kv_retrieval(length, depth, rng)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")

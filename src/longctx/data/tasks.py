"""Synthetic long-context retrieval tasks (docs/spec.md, "Evaluations"), as byte-token
examples.

- passkey (smoke test): a 5-digit number hidden at a depth in repeated filler text; the
  prompt ends with "The pass key is " and the answer is the number.
- kv-retrieval (discriminating): the context is many records ``key=value;`` (4-letter
  keys, all distinct; 4-digit values); the prompt ends with ``?key=`` naming the record at
  the given depth, and the answer is its value.

Each example is (prompt ids, answer ids), with len(prompt) + len(answer) == length,
and the token span of the needle (the passkey sentence, the asked record) in the prompt.
Depth 0 puts the needle at the start of the context, depth 1 at its end.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from .tokenizer import encode

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
    needle: tuple[int, int] = (0, 0)  # its token positions [start, end) in the prompt


def _ids(text: str) -> list[int]:
    """Token ids of ``text`` as a list."""
    return encode(text).tolist()


def _check(length: int, depth: float, minimum: int) -> None:
    if length < minimum:
        raise ValueError(f"the context length must be >= {minimum} tokens, got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def passkey(length: int, depth: float, rng: random.Random) -> Example:
    """A passkey example (module docstring) of ``length`` tokens."""
    key = f"{rng.randrange(10**4, 10**5)}"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is "
    _check(length, depth, len(needle) + len(question) + len(key) + 1)
    room = length - len(needle) - len(question) - len(key)
    filler = (FILLER * (room // len(FILLER) + 1))[:room]
    cut = round(depth * room)
    text = filler[:cut] + needle + filler[cut:] + question
    return Example(_ids(text), _ids(key), cut / max(room, 1), (cut, cut + len(needle)))


def kv_records(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n records with distinct random keys."""
    keys: set[str] = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(KEY_LETTERS) for _ in range(KEY_LEN)))
    ordered = sorted(keys)
    rng.shuffle(ordered)
    return [(k, "".join(rng.choice(VALUE_DIGITS) for _ in range(VALUE_LEN))) for k in ordered]


def kv_retrieval(length: int, depth: float, rng: random.Random) -> Example:
    """A kv-retrieval example (module docstring) of ``length`` tokens."""
    question_len = 1 + KEY_LEN + 1  # "?abcd="
    _check(length, depth, RECORD_LEN + question_len + VALUE_LEN)
    room = length - question_len - VALUE_LEN
    n = room // RECORD_LEN
    pad = room - n * RECORD_LEN  # leading spaces so that the total length is exact
    records = kv_records(n, rng)
    target = round(depth * (n - 1))
    key, value = records[target]
    text = " " * pad + "".join(f"{k}={v};" for k, v in records) + f"?{key}="
    start = pad + target * RECORD_LEN
    return Example(_ids(text), _ids(value), target / max(n - 1, 1), (start, start + RECORD_LEN))


def make_example(task: str, length: int, depth: float, rng: random.Random) -> Example:
    """An example of ``task`` with its needle at ``depth`` (0: start, 1: end)."""
    if task == "passkey":
        return passkey(length, depth, rng)
    if task == "kv-retrieval":
        return kv_retrieval(length, depth, rng)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


# --- training data for kv-retrieval -----------------------------------------------------

TARGETS = ("answer", "question")


def kv_training_example(
    length: int,
    window: int,
    rng: random.Random,
    *,
    question_fraction: float = 0.5,
    local_fraction: float = 0.5,
    targets: str = "answer",
    near_fraction: float = 0.0,
) -> tuple[list[int], list[int]]:
    """One training sequence for kv-retrieval: (inputs, targets), each ``length`` ids,
    targets -100 where there is no loss (``F.cross_entropy`` ignores them).

    The text is records ``key=value;`` (the evaluation's format). After the first
    ``window`` tokens, each next item is, with probability ``question_fraction``, a
    question ``?key=value;`` about an earlier record: with probability
    ``local_fraction`` one within the last ``window`` tokens, else one from an earlier
    window (what a memory model must read from memory). ``targets``: ``answer`` puts the
    loss on the value of each question (the evaluated tokens); ``question`` also on the
    key after its first letter, which an induction mechanism can predict.
    ``near_fraction``: chance that a new record's key is an earlier record's key with one
    letter changed (still distinct), so that matching some of a key's letters is not
    enough (random keys rarely share 3 letters in a short sequence, but often do among
    the thousands of records of a long evaluation context)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if not 0 < window < length:
        raise ValueError(f"window must be in (0, length = {length}), got {window}")
    fractions = (
        ("question_fraction", question_fraction),
        ("local_fraction", local_fraction),
        ("near_fraction", near_fraction),
    )
    for name, p in fractions:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    records = kv_records(length // RECORD_LEN + 2, rng)
    first_target = 2 if targets == "question" else 2 + KEY_LEN
    parts: list[str] = []
    loss: list[int] = []
    seen: list[tuple[str, str, int]] = []  # key, value, where the record starts
    size, used = 0, 0
    taken = {k for k, _ in records}  # keys stay distinct
    while size < length + 1:
        if size >= window and seen and rng.random() < question_fraction:
            local = rng.random() < local_fraction
            pool = [s for s in seen if (s[2] >= size - window) == local] or seen
            key, value, _ = rng.choice(pool)
            item = f"?{key}={value};"
            mask = [0] * first_target + [1] * (len(item) - first_target - 1) + [0]
        else:
            key, value = records[used]
            used += 1
            if near_fraction and seen and rng.random() < near_fraction:
                key = _near_key(rng.choice(seen)[0], rng, taken) or key
                taken.add(key)
            seen.append((key, value, size))
            item = f"{key}={value};"
            mask = [0] * len(item)
        parts.append(item)
        loss += mask
        size += len(item)
    ids = _ids("".join(parts))[: length + 1]
    y = [t if m else -100 for t, m in zip(ids[1:], loss[1 : length + 1])]
    return ids[:length], y


def _near_key(key: str, rng: random.Random, taken: set[str]) -> str | None:
    """``key`` with one letter changed, not in ``taken`` (None if 8 tries fail)."""
    for _ in range(8):
        i = rng.randrange(KEY_LEN)
        letter = rng.choice(KEY_LETTERS.replace(key[i], ""))
        near = key[:i] + letter + key[i + 1 :]
        if near not in taken:
            return near
    return None


TASK_PREFIX = "task:"
TRAINABLE_TASKS = ("kv-retrieval",)


class TaskData:
    """A synthetic training source (``data.source = "task:kv-retrieval"``): batches of
    :func:`kv_training_example` sequences in place of a text corpus. Every batch depends
    only on (seed, index), so a resumed run draws what an uninterrupted one would."""

    def __init__(
        self,
        task: str,
        window: int,
        *,
        question_fraction: float = 0.5,
        local_fraction: float = 0.5,
        targets: str = "answer",
        near_fraction: float = 0.0,
    ):
        if task not in TRAINABLE_TASKS:
            raise ValueError(
                f"no training data for task {task!r}; trainable tasks: {TRAINABLE_TASKS}"
            )
        self.task = task
        self.window = window
        self.options = dict(
            question_fraction=question_fraction,
            local_fraction=local_fraction,
            targets=targets,
            near_fraction=near_fraction,
        )

    @classmethod
    def from_config(cls, task: str, cfg) -> TaskData:
        """The source of ``task`` with the ``data.task_*`` keys of ``cfg`` (a DataConfig)."""
        return cls(
            task,
            cfg.task_window,
            question_fraction=cfg.task_questions,
            local_fraction=cfg.task_local,
            targets=cfg.task_targets,
            near_fraction=cfg.task_near,
        )

    def example(self, length: int, rng: random.Random) -> tuple[list[int], list[int]]:
        """One sequence of ``length`` (inputs, targets) drawn with ``rng``."""
        return kv_training_example(length, self.window, rng, **self.options)

    def batch(self, batch: int, context: int, seed: int, index: int, split: str = "train"):
        """(inputs, targets) (batch, context) int64; targets -100 where there is no loss."""
        rng = random.Random(f"{split}-{seed}-{index}")
        rows = [self.example(context, rng) for _ in range(batch)]
        x = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        y = torch.tensor([r[1] for r in rows], dtype=torch.int64)
        return x, y

    def chance_bits(self, context: int) -> float:
        """Bits per target token of a model that knows the format but retrieves nothing:
        each target predicted from the frequencies of targets at its offset within the
        question (uniform letters, uniform digits, a certain "="), estimated on 64
        sequences."""
        from collections import Counter

        x, y = self.batch(64, context, 0, 0, split="chance")
        counts: dict[int, Counter] = {}
        question = ord("?")
        for xs, ys in zip(x.tolist(), y.tolist()):
            last = -1
            for j, (token, target) in enumerate(zip(xs, ys)):
                if token == question:
                    last = j
                if target >= 0:
                    counts.setdefault(j - last, Counter())[target] += 1
        total = sum(sum(c.values()) for c in counts.values())
        bits = 0.0
        for c in counts.values():
            n = sum(c.values())
            bits -= sum(k * math.log2(k / n) for k in c.values())
        return bits / max(total, 1)


def task_source(source: str) -> str | None:
    """The task named by a ``task:<name>`` data source, else None."""
    return source[len(TASK_PREFIX) :] if source.startswith(TASK_PREFIX) else None

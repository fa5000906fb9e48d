"""Corpora: the installed Python standard library (built-in default) or the user's text.

Documents are encoded as bytes and packed into one token stream per split, separated by
EOD. The split is by a hash of each file's path (stable across machines and runs); a corpus
of a single document is split by position instead (its last ``val_percent``).
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import from_dict, to_dict
from .tasks import TARGETS
from .tokenizer import EOD, encode


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib", a text file, a directory, or a glob
    val_percent: float = 5.0
    max_bytes: int = 0  # 0 = no limit; else stop reading files after this many bytes
    # RETRO: a database built from this corpus (longctx retro build-db); each training
    # sequence's chunks read their neighbours from it
    retro_db: str = ""
    # source "task:kv-retrieval": synthetic sequences instead of text (longctx.data.tasks)
    task_questions: float = 0.5  # chance that an item after the first window is a question
    task_local: float = 0.5  # chance that a question is about a record in its own window
    task_targets: str = "answer"  # "answer" (value tokens) or "question" (also the key)
    task_near: float = 0.0  # chance that a new key is an earlier key with one letter changed
    # "local" questions ask about a record in the last task_window tokens; the others
    # about an earlier one (what a memory model must read from memory: its window)
    task_window: int = 256
    # sources whose rows continue their documents from step to step (LongMem training):
    # a task's documents have task_document tokens; a corpus leaves out documents shorter
    # than min_document tokens (0: none)
    task_document: int = 2048
    min_document: int = 0

    def __post_init__(self):
        if not 0 < self.val_percent < 100:
            raise ValueError(f"data.val_percent must be in (0, 100), got {self.val_percent}")
        if self.max_bytes < 0:
            raise ValueError(f"data.max_bytes must be >= 0, got {self.max_bytes}")
        for name in ("task_questions", "task_local", "task_near"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("task_document", "min_document"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.task_window, bool) or self.task_window < 1:
            raise ValueError(f"data.task_window must be >= 1, got {self.task_window}")
        if self.task_targets not in TARGETS:
            raise ValueError(
                f"data.task_targets must be one of {TARGETS}, got {self.task_targets!r}"
            )

    @classmethod
    def from_dict(cls, data: dict, where: str = "data") -> DataConfig:
        """From a ``[data]`` table."""
        return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        """The ``[data]`` table."""
        return to_dict(self)


@dataclass
class Corpus:
    train: np.ndarray  # uint16 token stream
    val: np.ndarray
    files: int
    description: str

    def unigram_bits_per_token(self) -> float:
        """Cross-entropy (bits/token) of validation under train-set token frequencies
        (add-one smoothed): the baseline a model must beat."""
        counts = np.bincount(self.train, minlength=int(max(self.train.max(), self.val.max())) + 1)
        p = (counts + 1) / (counts.sum() + counts.size)
        return float(-np.log2(p[self.val]).mean())


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library .py files, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _resolve(source: str) -> tuple[list[Path], Path | None, str]:
    if source == "stdlib":
        files = stdlib_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        return files, root, f"Python {sysconfig.get_python_version()} standard library ({root})"
    path = Path(source).expanduser()
    if path.is_file():
        return [path], path.parent, str(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        return files, path, f"directory {path}"
    matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if matches:
        return matches, None, f"glob {source!r}"
    raise ValueError(
        f"data.source {source!r} is not 'stdlib', an existing file or directory, or a glob "
        "that matches files"
    )


def _is_binary(data: bytes) -> bool:
    head = data[:8192]
    if b"\x00" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte char cut at the end is fine
        return exc.start < len(head) - 4
    return False


def _in_val(name: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")
    return (h % 10000) < val_percent * 100


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus ``cfg.source`` names and split it (module docstring)."""
    files, root, description = _resolve(cfg.source)
    docs: list[tuple[str, bytes]] = []
    skipped_binary = []
    total = 0
    for f in files:
        data = f.read_bytes()
        if not data.strip():
            continue
        if _is_binary(data):
            skipped_binary.append(f)
            continue
        name = f.relative_to(root).as_posix() if root else f.as_posix()
        docs.append((name, data))
        total += len(data)
        if cfg.max_bytes and total >= cfg.max_bytes:
            break
    if not docs:
        why = (
            f"all {len(skipped_binary)} file(s) look binary (e.g. {skipped_binary[0]})"
            if skipped_binary
            else "no non-empty text files"
        )
        raise ValueError(f"the corpus {description} is empty: {why}; give text files")
    if len(docs) == 1:
        tokens = encode(docs[0][1])
        cut = int(len(tokens) * (1 - cfg.val_percent / 100))
        train, val = tokens[:cut], tokens[cut:]
    else:
        parts = {True: [], False: []}
        for name, data in docs:
            parts[_in_val(name, cfg.val_percent)].extend([encode(data), np.array([EOD], np.uint16)])
        if not parts[True] or not parts[False]:  # few files: move one over
            side = not parts[True]  # the empty side takes one document
            parts[side], parts[not side] = parts[not side][-2:], parts[not side][:-2]
        train, val = np.concatenate(parts[False]), np.concatenate(parts[True])
    if len(train) < 2 or len(val) < 2:
        raise ValueError(
            f"the corpus {description} is too small to split ({total} bytes); give more text"
        )
    return Corpus(train=train, val=val, files=len(docs), description=description)


def sample_batch(
    tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows for training step ``step``: (inputs, targets), each (batch, seq_len).

    Depends only on (seed, step), so a resumed run draws exactly the batches an
    uninterrupted run would have drawn.
    """
    x, _ = sample_windows(tokens, batch, seq_len, seed, step)
    return x[:, :-1], x[:, 1:]


def sample_windows(
    tokens: np.ndarray, batch: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, np.ndarray]:
    """The windows of :func:`sample_batch`: (rows (batch, seq_len + 1) int64, their start
    offsets in ``tokens`` (batch,))."""
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the training split has {len(tokens)} tokens, fewer than the context length "
            f"{seq_len} + 1; use a shorter context or more text"
        )
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=g).numpy()
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()]).astype(np.int64)
    return torch.from_numpy(rows), starts


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of seq_len + 1 tokens (at most max_windows),
    spread evenly over the split. Each is a (seq_len + 1,) int64 tensor."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"the validation split has {len(tokens)} tokens, fewer than the context length "
            f"{seq_len} + 1"
        )
    idx = np.linspace(0, n - 1, num=min(n, max_windows)).round().astype(int)
    idx = sorted(set(idx.tolist()))
    return [
        torch.from_numpy(tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64))
        for i in idx
    ]

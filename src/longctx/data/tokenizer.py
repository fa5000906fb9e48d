"""Byte tokenizer: ids 0..255 are bytes; a few specials follow. Nothing to download."""

from __future__ import annotations

import numpy as np

EOD = 256  # end of document: separates documents in a packed stream
PAD = 257
BOS = 258
VOCAB_SIZE = 259  # ids actually used; a model's vocabulary may be padded above this
SPECIAL_NAMES = {EOD: "<eod>", PAD: "<pad>", BOS: "<bos>"}


def encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint16 token ids."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def decode(ids, *, show_specials: bool = False) -> str:
    """Token ids back to text (invalid UTF-8 replaced); specials dropped unless shown."""
    out = bytearray()
    for i in (int(x) for x in ids):
        if i < 256:
            out.append(i)
        elif show_specials:
            out += SPECIAL_NAMES.get(i, f"<{i}>").encode()
    return out.decode("utf-8", errors="replace")

"""Text generation from a trained run (``longctx generate RUN_DIR``): text in, streamed
text out, with a cache policy; optional per-step statistics as JSON lines."""

from __future__ import annotations

import codecs
import json
import sys
from pathlib import Path

from ._util import resolve_device
from .data import EOD, encode
from .model import Generation, generate, latest_checkpoint, load_model


def generate_text(
    run_dir: Path,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    cache: str = "full",
    recompute_chunk: int = 256,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: list[str] = (),
    stop_at_eod: bool = True,
    checkpoint: Path | None = None,
    stream=None,
    stats_path: Path | None = None,
    device=None,
    memory: dict | None = None,
) -> Generation:
    """Generate from a trained run, writing the text to ``stream`` as it is produced
    (``device``: auto, cpu, cuda or cuda:N; ``cache`` and ``recompute_chunk`` as in
    :func:`longctx.model.generate`). ``memory``: settings of a memory model's layers
    (``DecoderLM.configure_memory``; ``capacity="fit"``: the prompt plus
    ``max_new_tokens``)."""
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(Path(run_dir) / "checkpoints")
    model, _ = load_model(ckpt, resolve_device(device))
    ids = encode(prompt).tolist()
    if not ids:
        raise ValueError("the prompt is empty; give some text with --prompt or --prompt-file")
    if memory:
        memory = dict(memory)
        if memory.get("capacity") == "fit":
            memory["capacity"] = len(ids) + max_new_tokens
        model.configure_memory(**memory)
    stops = [encode(s).tolist() for s in stop if s]
    if stop_at_eod:
        stops.append([EOD])
    out = stream or sys.stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_token(tok: int) -> None:
        if tok < 256:
            out.write(decoder.decode(bytes([tok])))
            out.flush()

    result = generate(
        model,
        ids,
        max_new_tokens,
        cache=cache,
        recompute_chunk=recompute_chunk,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stops,
        on_token=on_token,
    )
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    if stats_path is not None:
        with Path(stats_path).open("w") as f:
            for i, (sec, nbytes) in enumerate(zip(result.step_seconds, result.cache_bytes)):
                f.write(
                    json.dumps(
                        {
                            "step": i + 1,
                            "position": len(ids) + i,
                            "seconds": sec,
                            "tokens_per_s": 1 / sec if sec > 0 else None,
                            "cache_bytes": nbytes,
                        }
                    )
                    + "\n"
                )
    return result

"""``longctx bench memory``: what reading a Focused-Transformer memory costs as the store
grows, for each retrieval (dense, exact top-k, the faiss ``ivf`` index).

One model (a trained run with ``--run``, else the ``memory-tiny`` preset with random
weights) reads a kv-retrieval context. Its memory layers' stores are filled window by
window up to each size in ``--sizes`` (4k ... 1M entries; the fill reads memory through
the ivf index with one probed list, which is cheap); at each size, each retrieval
processes ``--windows`` further windows (an evaluated window: every query reads memory,
then the window is written) and ``--decode`` single tokens (a generated token), and the
time spent in the memory layers is reported per token, with the bytes of the store and
of the index. For ``ivf`` the recall against exact top-k is measured on one more window
(not timed). Per-token times come from the medians over windows and tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from .._util import Progress, parse_numbers, resolve_device
from ..config import load_preset
from ..data.tasks import kv_retrieval
from ..model import DecoderLM, ModelConfig, latest_checkpoint, load_model
from ..nn.retrieval import EXACT_BELOW, require_faiss
from ..nn.state import MemoryState
from . import common

RETRIEVAL_MODES = {
    "dense": {"retrieval": "dense"},
    "topk": {"retrieval": "topk"},
    "ivf": {"retrieval": "faiss", "faiss_index": "ivf"},
}
FILL_CHUNK = 16  # windows per forward call while filling


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``longctx bench memory``."""
    p.add_argument("--run", type=Path, help="a trained memory run (default: random weights)")
    p.add_argument("--preset", default="memory-tiny", help="architecture without --run")
    p.add_argument("--sizes", default="4096,16384,65536,262144,1048576", help="store entries")
    p.add_argument("--retrievals", default="dense,topk,ivf", help="dense, topk, ivf")
    p.add_argument("--windows", type=int, default=3, help="timed windows per case")
    p.add_argument("--decode", type=int, default=8, help="timed single tokens per case")
    p.add_argument("--nprobe", type=int, default=0, help="ivf lists per query (0: automatic)")
    p.add_argument("--topk", type=int, default=0, help="keys per query (0: the model's)")
    p.add_argument(
        "--exact-below",
        type=int,
        default=EXACT_BELOW,
        help="ivf rows are searched exactly until they hold this many entries",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-out/memory"))
    common.add_device_option(p)


def _model(args, device) -> tuple[DecoderLM, str]:
    if args.run is not None:
        model, _ = load_model(latest_checkpoint(Path(args.run) / "checkpoints"), device)
        return model.eval(), str(args.run)
    cfg = ModelConfig.from_dict(load_preset(args.preset).get("model", {}))
    torch.manual_seed(args.seed)
    return DecoderLM(cfg).eval().to(device), f"{args.preset} (random weights)"


class _LayerTimer:
    """Seconds spent in the given modules' forwards (hooks; synchronised)."""

    def __init__(self, modules, device):
        self.seconds = 0.0
        self.device = device
        self._start = 0.0
        self._hooks = []
        for m in modules:
            self._hooks.append(m.register_forward_pre_hook(self._pre))
            self._hooks.append(m.register_forward_hook(self._post))

    def _pre(self, *_):
        common.synchronize(self.device)
        self._start = time.perf_counter()

    def _post(self, *_):
        common.synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def remove(self):
        for h in self._hooks:
            h.remove()


def run(args) -> list[dict]:
    """Run the benchmark (module docstring); returns its rows."""
    sizes = parse_numbers(args.sizes, int, "--sizes")
    modes = [m.strip() for m in args.retrievals.split(",") if m.strip()]
    bad = [m for m in modes if m not in RETRIEVAL_MODES]
    if bad or not modes:
        raise ValueError(f"unknown retrieval {bad}; choose from {tuple(RETRIEVAL_MODES)}")
    if sizes != sorted(sizes) or sizes[0] < 1:
        raise ValueError(f"--sizes must be increasing positive entry counts, got {sizes}")
    for name in ("windows", "decode"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    require_faiss()  # the fill reads memory through the ivf index
    device = resolve_device(args.device)
    model, source = _model(args, device)
    layers = model.memory_layers()
    if not layers:
        raise ValueError(f"{source} has no memory layers: bench memory needs a memory model")
    W = layers[0].window
    bad_sizes = [n for n in sizes if n % W]
    if bad_sizes:
        raise ValueError(f"--sizes must be multiples of the memory window {W}, got {bad_sizes}")
    topk = args.topk or layers[0].topk
    per_size = len(modes) * ((args.windows + 2) * W + args.decode)  # tokens after each size
    total = sizes[-1] + len(sizes) * per_size
    tokens = torch.tensor(kv_retrieval(total, 0.5, random.Random(args.seed)).prompt)[None]
    tokens = tokens.to(device)
    model.configure_memory(
        capacity=total,
        retrieval="faiss",
        faiss_index="ivf",
        nprobe=1,
        exact_below=args.exact_below,
    )
    for layer in layers:
        layer.topk = topk
    state = model.new_state(1)
    stores = [s.store for s in state.layers if isinstance(s, MemoryState)]  # grow in place
    info = common.machine_info(device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    results.write_text("")
    timer = _LayerTimer(layers, device)
    rows: list[dict] = []
    bar = Progress(sizes[-1], "bench memory (filling)", unit="tok")
    pos = 0

    def feed(n: int) -> None:
        nonlocal pos
        with torch.no_grad():
            model.hidden_states(tokens[:, pos : pos + n], state)
        pos += n

    try:
        for size in sizes:
            entries = stores[0].size(0)
            while entries < size:  # fill (untimed) up to this size
                step = min(FILL_CHUNK * W, size - entries)
                feed(step)
                bar.update(step)
                entries += step
            timer.take()
            for mode in modes:
                row = _measure(model, stores, mode, size, feed, timer, args, W)
                row.update(
                    bench="memory",
                    model=source,
                    topk=topk,
                    machine=info,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                )
                rows.append(row)
                common.append_jsonl(results, row)
                bar.set_postfix(case=f"{mode} {size:,}")
    finally:
        bar.close()
        timer.remove()

    def draw():
        return common.plot_sweep(
            rows,
            args.out / "memory.png",
            x="entries",
            xlabel="memory entries per layer and row",
            panels=[
                ("eval_ms_per_token", "memory layers, ms per evaluated token"),
                ("decode_ms_per_token", "memory layers, ms per generated token"),
                ("bytes_mib", "store + index (MiB)"),
            ],
            series=lambda r: (r["retrieval"], r["retrieval"], False),
            title=f"memory retrieval cost, {source}, top-{topk}, on {info['cpu']}",
        )

    common.report(common.format_table(rows, COLUMNS), summarize(rows), args.out, results, draw)
    return rows


def _measure(model, stores, mode, size, feed, timer, args, W) -> dict:
    """Time ``mode`` on the next windows and single tokens; recall on one more window.
    Dense and exact top-k run with the stores' indexes detached (their upkeep is ivf's
    cost), which then catch up with what was written meanwhile."""
    model.configure_memory(nprobe=args.nprobe, recall_every=0, **RETRIEVAL_MODES[mode])
    indexes = [s.index for s in stores]
    since = [list(s.written) for s in stores]
    if mode != "ivf":
        for store in stores:
            store.index = None
    windows = []
    for _ in range(args.windows):
        feed(W)
        windows.append(timer.take() / W)
    decode = []
    for _ in range(args.decode):
        feed(1)
        decode.append(timer.take())
    if args.decode % W:
        feed(W - args.decode % W)  # back to a window boundary
    timer.take()
    recall = None
    if mode == "ivf":
        for store in stores:
            store.index.hits = store.index.total = 0
        model.configure_memory(recall_every=1)
        feed(W)
        timer.take()
        model.configure_memory(recall_every=0)
        hits = sum(s.index.hits for s in stores)
        total = sum(s.index.total for s in stores)
        recall = hits / total if total else None  # None: rows still searched exactly
    store_bytes = sum(s.nbytes for s in stores)
    index_bytes = sum(s.index.nbytes for s in stores) if mode == "ivf" else 0
    for store, index, before in zip(stores, indexes, since):
        if store.index is None:
            store.index = index
            _catch_up(store, before)
    return {
        "status": "ok",
        "retrieval": mode,
        "entries": size,
        "eval_ms_per_token": 1000 * statistics.median(windows),
        "decode_ms_per_token": 1000 * statistics.median(decode),
        "store_bytes": store_bytes,
        "index_bytes": index_bytes,
        "bytes_mib": (store_bytes + index_bytes) / 2**20,
        "recall": recall,
        "nprobe": args.nprobe if mode == "ivf" else None,
    }


def _catch_up(store, written_before: list[int]) -> None:
    """Give a re-attached index the entries written while it was detached (the store
    has room for everything: nothing was replaced)."""
    for row, before in enumerate(written_before):
        slots = ((store.age[row] >= before) & store.valid[row]).nonzero().flatten()
        if len(slots):
            rows = torch.full_like(slots, row)
            store.index.written(store, rows, slots, torch.zeros_like(slots, dtype=torch.bool))


COLUMNS = [
    ("retrieval", "retrieval", ""),
    ("entries", "entries", ","),
    ("eval ms/token", "eval_ms_per_token", ".3f"),
    ("decode ms/token", "decode_ms_per_token", ".3f"),
    ("store + index MiB", "bytes_mib", ".1f"),
    ("recall", "recall", ".3f"),
]


def summarize(rows: list[dict]) -> dict:
    """Per retrieval: per-token time at the largest store over that at the store nearest
    16k entries; ivf's lowest recall."""
    out, lines = {}, [""]
    for mode in dict.fromkeys(r["retrieval"] for r in rows):
        mine = sorted((r for r in rows if r["retrieval"] == mode), key=lambda r: r["entries"])
        if len(mine) < 2:
            continue
        ref = min(mine, key=lambda r: abs(r["entries"] - 16384))
        big = mine[-1]
        for kind in ("eval", "decode"):
            ratio = big[f"{kind}_ms_per_token"] / ref[f"{kind}_ms_per_token"]
            out[f"{mode}_{kind}_time_{big['entries']}_over_{ref['entries']}"] = ratio
        lines.append(
            f"{mode}: per evaluated token {ref['eval_ms_per_token']:.3f} ms at "
            f"{ref['entries']:,} entries, {big['eval_ms_per_token']:.3f} ms at "
            f"{big['entries']:,} ({big['eval_ms_per_token'] / ref['eval_ms_per_token']:.1f}x)"
        )
        recalls = [r["recall"] for r in mine if r.get("recall") is not None]
        if recalls:
            out[f"{mode}_min_recall"] = min(recalls)
            lines.append(f"{mode}: recall against exact top-k {min(recalls):.3f} at worst")
    out["lines"] = lines
    return out

"""A comparison's outputs: one Markdown table, one JSON with every figure (and the
machine and versions), and one PNG of quality against cost."""

from __future__ import annotations

from pathlib import Path

from .._util import atomic_write_json, pyplot, save_figure
from ..bench.common import human_bytes

TABLE, JSON, PNG = "table.md", "results.json", "compare.png"


def _kv(fig: dict, length) -> str:
    cell = (fig.get("kv") or {}).get(str(length))
    if not cell:
        return "-"
    lo, hi = cell["ci95"]
    return f"{100 * cell['accuracy']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _tokens(n: int) -> str:
    """A length as 16k (whole multiples of 1,024) or 160."""
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _params(fig: dict) -> str:
    total, trained = fig.get("params"), fig.get("trainable_params")
    if total is None:
        return "-"
    text = f"{total / 1e6:.2f}M"
    return text if trained in (None, total) else f"{text} ({trained / 1e6:.2f}M trained)"


def markdown_table(result: dict) -> str:
    """The comparison as one Markdown table (a failed preset: its error), with a line
    on the settings under it."""
    settings = result["settings"]
    lengths = settings["lengths"]
    head = [
        "preset",
        "method",
        "parameters",
        "steps",
        "tokens",
        "train tokens/s",
        "peak memory",
        "bpb 1x",
        "bpb 4x",
        *[f"kv {_tokens(n)}" for n in lengths],
        f"decode ms/token ({_tokens(settings['decode_context'])})",
        "cache",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failures = []
    for name, fig in result["results"].items():
        if "error" in fig:
            cells = [name, f"failed ({fig.get('stage', 'run')})"] + ["-"] * (len(head) - 2)
            failures.append(
                f"- `{name}` failed while {fig.get('stage', 'running')}: {fig['error']}"
            )
        else:
            dec = fig.get("decode") or {}
            peak = fig.get("peak_mem_gib")
            cells = [
                name,
                fig.get("method", "-"),
                _params(fig),
                _num(fig.get("steps"), ","),
                _num(fig.get("tokens"), ","),
                _num(fig.get("train_tokens_per_s"), ",.0f"),
                "-" if peak is None else human_bytes(peak * 2**30),
                _num((fig.get("bpb") or {}).get("1x"), ".3f"),
                _num((fig.get("bpb") or {}).get("4x"), ".3f"),
                *[_kv(fig, n) for n in lengths],
                _num(dec.get("ms_per_token"), ".1f"),
                "-" if dec.get("cache_bytes") is None else human_bytes(dec["cache_bytes"]),
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(
        f"Each preset trained {settings['minutes']:g} minutes (wall clock, learning rate "
        f"decayed over that time) on `{settings['data']}`, seed {settings['seed']}. "
        f"bpb: validation bits per byte at 1x and 4x the training context "
        f"({settings['windows']} windows each). kv: kv-retrieval exact match, "
        f"{5 * settings['trials']} trials per length, 95% Wilson interval. Decoding: greedy, "
        f"median of {settings['decode_tokens'] - 1} steps after a "
        f"{settings['decode_context']:,}-token prompt; cache: the decode state's bytes. "
        f"Peak memory: the training process's peak (resident set on a CPU)."
    )
    if failures:
        lines += ["", "Failures:", *failures]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path | None:
    """Bits per byte by position (1x context) for each measured preset, then quality
    against cost, one point per preset: bpb at 1x against training tokens/s, bpb at 4x
    against decode ms/token, kv-retrieval at the longest length against the decode
    cache's bytes."""
    done = {n: f for n, f in result["results"].items() if "error" not in f}
    if not done:
        return None
    longest = str(max(result["settings"]["lengths"]))
    panels = [
        ("training tokens/s", lambda f: f.get("train_tokens_per_s"),
         "bpb at 1x context", lambda f: (f.get("bpb") or {}).get("1x"), False),
        ("decode ms/token", lambda f: (f.get("decode") or {}).get("ms_per_token"),
         "bpb at 4x context", lambda f: (f.get("bpb") or {}).get("4x"), False),
        ("decode cache bytes", lambda f: (f.get("decode") or {}).get("cache_bytes"),
         f"kv-retrieval at {int(longest):,}",
         lambda f: ((f.get("kv") or {}).get(longest) or {}).get("accuracy"), True),
    ]  # fmt: skip
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 5))
    for name, f in done.items():  # where in the context each method's bits go
        buckets = (f.get("bpb_by_position") or {}).get("1x") or []
        xs = [max(1, b["positions"][0]) for b in buckets]
        axes[0].plot(xs, [b["bpb"] for b in buckets], marker=".", label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("position (tokens, 1x context)")
    axes[0].set_ylabel("bits per byte")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for ax, (xlabel, xf, ylabel, yf, logx) in zip(axes[1:], panels):
        for name, f in done.items():
            x, y = xf(f), yf(f)
            if x is None or y is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    s = result["settings"]
    fig.suptitle(f"longctx compare: {s['minutes']:g} minutes per preset on {s['data']}")
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(result: dict, out: Path) -> dict[str, Path]:
    """Write the table, the JSON and the PNG into ``out``; their paths."""
    paths = {"table": out / TABLE, "json": out / JSON}
    (out / TABLE).write_text(markdown_table(result))
    atomic_write_json(out / JSON, result)
    png = plot(result, out / PNG)
    if png is not None:
        paths["png"] = png
    return paths


__all__ = ["markdown_table", "plot", "write_report"]

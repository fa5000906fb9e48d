"""The ``longctx`` command: maps subcommands to library functions and prints their results."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

# benchmarks: name -> (module, help); a module is imported only when its command runs
BENCHES = {
    "attention": ("attention", "attention ops vs N: time, useful GFLOP/s, peak memory"),
    "train": (
        "train",
        "training tokens/s and peak memory vs context: dense vs dilated vs sliding",
    ),
    "generate": (
        "generate",
        "decoding latency and cache bytes vs context for the three cache policies",
    ),
    "memory": (
        "memory",
        "memory layers: time per token and bytes vs store size (dense, top-k, ivf), recall",
    ),
    "hf": (
        "hf",
        "a tiny Llama in transformers: sdpa vs longctx_dilated prefill, decode, cache bytes",
    ),
    "colt5": ("colt5", "CoLT5 routed feed-forward and attention vs dense: time and FLOPs vs N"),
    "parallel": (
        "parallel",
        "sequence-parallel strategies on gloo: bytes per rank and time vs N and P",
    ),
}


# --------------------------------------------------------------------------- train


def _train(args) -> int:
    """One flow for one process and for torchrun: only the parallel object differs."""
    from .train import SingleProcess, prepare_run, resolve_config, train

    if args.resume:  # every rank reads (and rewrites) the same config.json
        run_dir = _resume_dir(args)
        cfg = prepare_run(run_dir, None, True, args.set)
    else:
        cfg, run_dir = resolve_config(args.preset, args.config, args.set), None
    parallel = _parallel(args, cfg)
    try:
        run_dir = run_dir or _new_run(args, cfg, parallel)
        if parallel.is_main:
            print(f"run directory: {run_dir}")
            if parallel.describe():
                print(parallel.describe())
        result = train(
            cfg,
            run_dir,
            resume=args.resume,
            checkpoint=args.checkpoint,
            parallel=parallel,
            device=getattr(parallel, "device", args.device),
        )
    except RuntimeError as exc:  # gloo/NCCL report a lost peer or a timeout this way
        if isinstance(parallel, SingleProcess):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"longctx: error: rank {parallel.rank}: a collective failed ({first}); another "
            f"rank probably died or timed out (--sp-timeout {args.sp_timeout:g} s)",
            file=sys.stderr,
        )
        return 1
    finally:
        parallel.close()
    if not parallel.is_main:
        return 130 if result.stopped_by == "interrupt" else 0
    rc = _report(result, run_dir)
    if rc == 0 and not args.no_eval:
        _after_training_eval(
            run_dir, cfg=cfg, model=result.model, corpus=result.corpus, device=args.device
        )
    return rc


def _parallel(args, cfg):
    """One process, or (under torchrun, or with --sequence-parallel P > 1) sequence
    parallelism over P ranks and data parallelism over the rest."""
    from .train import SingleProcess

    if args.sequence_parallel <= 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    from .distributed.training import setup_training

    return setup_training(
        args.sequence_parallel,
        args.sp_strategy,
        cfg.model,
        cfg.train.context,
        timeout_s=args.sp_timeout,
        device=args.device,
    )


def _new_run(args, cfg, parallel) -> Path:
    """A fresh run's directory, prepared by the main process (the others learn its name
    and its verdict)."""
    from .train import prepare_run

    name, error = args.out or _default_run_dir(args), None
    if parallel.is_main:
        try:
            prepare_run(Path(name), cfg, False)
        except ValueError as exc:
            error = str(exc)
    name, error = parallel.broadcast([name, error])
    if error is not None:
        raise ValueError(error)
    return Path(name)


def _resume_dir(args) -> Path:
    if args.out is None:
        raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
    if args.preset or args.config:
        raise ValueError("--resume continues a run with its saved config; drop --preset/--config")
    return Path(args.out)


def _default_run_dir(args) -> str:
    name = args.preset or (Path(args.config).stem if args.config else "tiny")
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _report(result, run_dir: Path) -> int:
    print(
        f"stopped at step {result.step} ({result.tokens:,} tokens) by {result.stopped_by}; "
        f"checkpoint {result.checkpoint}"
    )
    if result.stopped_by == "interrupt":
        print(f"continue with: longctx train --resume --out {run_dir}")
        return 130
    print(
        f"validation: {result.val_bpb:.3f} {result.unit} "
        f"({result.baseline} {result.unigram_bpb:.3f} {result.unit})"
    )
    return 0


def _after_training_eval(
    run_dir: Path, trials: int = 20, cfg=None, model=None, corpus=None, device=None
) -> None:
    """Bits per byte on the corpus; for a run trained on a synthetic task, a short
    retrieval evaluation of that task (the full sweep is ``longctx eval --task``).
    ``cfg``, ``model``, ``corpus``: the run's, when already in memory."""
    from .data import task_source
    from .evaluate import evaluate_run

    if cfg is None:
        from .train import load_run_config

        cfg = load_run_config(Path(run_dir))
    task = task_source(cfg.data.source)
    if task is None:
        _print_eval(evaluate_run(run_dir, model=model, corpus=corpus, device=device))
        return
    ctx = cfg.train.context
    _retrieval(Path(run_dir), task, [ctx, 8 * ctx], [0.0, 0.5, 1.0], trials, 0, device)


# --------------------------------------------------------------------------- eval, info


def _eval(args) -> int:
    from ._util import parse_numbers
    from .evaluate import evaluate_run

    if args.task == "retro":
        return _eval_retro(args)
    if args.task == "longmem":
        return _eval_longmem(args)
    if args.task != "bpb":
        lengths = parse_numbers(args.lengths, int, "--lengths")
        depths = parse_numbers(args.depths, float, "--depths")
        run_dir = Path(args.run_dir)
        _retrieval(run_dir, args.task, lengths, depths, args.trials, args.seed, args.device, args)
        return 0
    contexts = parse_numbers(args.contexts, int, "--contexts") if args.contexts else None
    res = evaluate_run(
        Path(args.run_dir),
        contexts=contexts,
        windows=args.windows,
        device=args.device,
        memory=_memory_options(args),
    )
    _print_eval(res)
    return 0


def _eval_longmem(args) -> int:
    from ._util import resolve_device, settings_tag
    from .data import load_corpus, task_source
    from .evaluate.longmem import evaluate_longmem, write_longmem_results
    from .model import latest_checkpoint, load_model
    from .train.config import RunConfig

    run_dir = Path(args.run_dir)
    model, state = load_model(
        latest_checkpoint(run_dir / "checkpoints"), resolve_device(args.device)
    )
    cfg = RunConfig.from_dict(state["config"])
    if task_source(cfg.data.source) is not None:
        raise ValueError(
            f"{run_dir} trained on {cfg.data.source}; --task longmem reads long documents of "
            "a text corpus (evaluate a task run with --task kv-retrieval)"
        )
    baseline = None
    if args.baseline:
        baseline, _ = load_model(
            latest_checkpoint(Path(args.baseline) / "checkpoints"), resolve_device(args.device)
        )
    memory = _memory_options(args)
    tag = settings_tag(memory)  # other bank settings: their own files
    if memory.get("capacity") == "fit":  # the bank holds every earlier segment
        memory["capacity"] = args.segments * cfg.model.longmem.segment
    if memory:
        if model.side is None or not model.cfg.longmem.memory:
            raise ValueError(
                f"{run_dir} has no bank (a LongMem run with model.longmem.memory = true); "
                "--memory-* options set how the bank is kept and read"
            )
        model.configure_memory(**memory)
    corpus = load_corpus(cfg.data)
    res = evaluate_longmem(
        model, corpus.val, segments=args.segments, windows=args.windows, baseline=baseline
    )
    res["bank"] = model.cfg.longmem.bank_settings()
    title = f"LongMem: {run_dir.name}{tag}"
    js, png = write_longmem_results(res, run_dir / "eval", title, tag)
    print(
        f"\nLongMem evaluation of {run_dir} ({res['documents']} documents, "
        f"{res['segments']} segments of {res['segment']} tokens):"
    )
    for name, curve in res["bpb_by_segment"].items():
        cells = " ".join(f"{v:.3f}" for v in curve)
        label = name.replace("_", " ")
        print(f"  {label:>10}: {cells}  (segments >= 2: {res['bpb_segments_from_2'][name]:.3f})")
    if res["gate"] is not None:
        print(f"  gate (memory share per head): {', '.join(f'{g:.2f}' for g in res['gate'])}")
    print(f"  results: {js}\n  plot: {png}")
    return 0


def _eval_retro(args) -> int:
    from ._util import resolve_device
    from .data import load_corpus
    from .evaluate.retro import evaluate_retro, write_retro_results
    from .model import latest_checkpoint, load_model
    from .retro import RetroDB
    from .train.config import RunConfig

    run_dir = Path(args.run_dir)
    if _memory_options(args):
        raise ValueError(
            "--memory-* options set a memory or LongMem model's memory; a RETRO run reads "
            "its database (neighbours per chunk: --retro-k)"
        )
    device = resolve_device(args.device)
    model, state = load_model(latest_checkpoint(run_dir / "checkpoints"), device)
    cfg = RunConfig.from_dict(state["config"])
    if not cfg.model.retro.enabled or not cfg.data.retro_db:
        raise ValueError(f"{run_dir} is not a RETRO run (model.retro.layers, data.retro_db)")
    baseline = None
    if args.baseline:
        baseline, _ = load_model(latest_checkpoint(Path(args.baseline) / "checkpoints"), device)
        baseline.eval()
    db = RetroDB.open(cfg.data.retro_db)
    corpus = load_corpus(cfg.data)
    res = evaluate_retro(
        model, db, corpus.val, cfg.train.context, windows=args.windows, k=args.retro_k,
        baseline=baseline,
    )  # fmt: skip
    js, png = write_retro_results(res, run_dir / "eval", f"RETRO leakage: {run_dir.name}")
    print(f"\nRETRO evaluation of {run_dir} ({res['chunks']} chunks of {res['chunk']} tokens):")
    for name, value in res["bpb"].items():
        print(f"  {name:>10}: {value:.3f} bits/byte")
    print(f"  oracle on chunks >= 2: {res['oracle_bpb_chunks_from_2']:.3f} bits/byte")
    cp = res["copying"]
    print(
        f"  copyable ({cp['context']}-token context + token in a neighbour read): "
        f"{cp['share']:.1%} of the tokens of chunks >= 1"
    )
    for key in ("copyable", "rest"):
        cells = ", ".join(f"{n} {v:.3f}" for n, v in cp[key].items() if v is not None)
        print(f"    bits/byte on the {key + ':':<9} {cells}")
    rep = res["in_context_copying"]
    first = rep["model"]
    cells = [f"first copy {first['first']:.3f}, repeat {first['repeat']:.3f}"]
    if "baseline" in rep:
        cells.append(f"baseline {rep['baseline']['first']:.3f} / {rep['baseline']['repeat']:.3f}")
    print(
        f"  in-context copying ({first['spans']} validation spans of {first['span']} tokens, "
        f"each fed twice; retrieval off): {'; '.join(cells)} bits/byte"
    )
    for row in res["leakage"]:
        base = row.get("baseline_bpb")
        extra = "" if base is None else f", baseline {base:.3f}"
        value = "-" if row["bpb"] is None else f"{row['bpb']:.3f}"
        print(f"  r(C) <= {row['alpha']:<5}: {row['share']:6.1%} of chunks, {value}{extra}")
    print(f"  results: {js}\n  plot: {png}")
    return 0


def _print_eval(res: dict) -> None:
    print(f"\nevaluation of {res['checkpoint']} (unigram baseline {res['unigram_bpb']:.3f}):")
    for entry in res["by_context"]:
        if "bpb" in entry:
            print(
                f"  context {entry['context']:>7,}: {entry['bpb']:.3f} bits/byte "
                f"({entry['windows']} windows)"
            )
        else:
            print(f"  context {entry['context']:>7,}: skipped ({entry['skipped']})")
    if "by_position" in res:
        cells = ", ".join(
            f"{b['positions'][0]}-{b['positions'][1] - 1}: {b['bpb']:.2f}"
            for b in res["by_position"]
        )
        print(f"  by position (training context): {cells}")
    print(f"  results: {res['path']}")
    for p in res["plots"]:
        print(f"  plot: {p}")


def _retrieval(
    run_dir: Path, task: str, lengths, depths, trials: int, seed: int, device, args=None
):
    from ._util import resolve_device, settings_tag
    from .evaluate.retrieval import evaluate_retrieval, write_results
    from .model import latest_checkpoint, load_model

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    model, _ = load_model(ckpt, resolve_device(device))
    memory = _memory_options(args)
    tag = settings_tag(memory)  # other memory settings: their own files
    capacity = memory.pop("capacity", None)
    if memory:
        model.configure_memory(**memory)
    result = evaluate_retrieval(
        model, task, lengths, depths, trials, seed=seed, memory_capacity=capacity
    )
    result["checkpoint"] = str(ckpt)
    if model.side is not None:  # LongMem: how the bank was read
        result["longmem"] = model.cfg.longmem.bank_settings()
    js, png = write_results(result, run_dir / "eval", f"{task}: {run_dir.name}", tag)
    print(f"\n{task} exact match ({trials} trials per cell, 95% Wilson interval):")
    for length, r in result["by_length"].items():
        lo, hi = r["ci95"]
        acc = f"{r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]"
        line = f"  context {int(length):>7,}: {acc} ({r['trials']} trials"
        line += f", {r['seconds_per_trial']:.1f} s per trial)"
        if r.get("evicted"):
            kept = r["accuracy_in_memory"]
            kept_text = "-" if kept is None else f"{kept:.1%}"
            line += f"; needle in memory: {kept_text} of {r['trials_in_memory']}"
            line += f", evicted: {r['accuracy_evicted']:.1%} of {r['trials_evicted']}"
        print(line)
    mem = result.get("memory")
    if mem:
        text = f"  memory: capacity {mem['capacity']}, retrieval {mem['retrieval']}"
        if mem["retrieval"] == "faiss":
            text += f" ({mem['faiss_index']}, nprobe {mem['nprobe'] or 'auto'})"
        if "recall" in mem:
            text += f", recall vs exact top-k {mem['recall']:.3f}"
        print(text)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"  results: {js}\n  heatmap: {png}")


def _memory_options(args) -> dict:
    """The ``--memory-*`` options given (for DecoderLM.configure_memory)."""
    if args is None:
        return {}
    out = {}
    if args.memory_capacity is not None:
        out["capacity"] = args.memory_capacity
    if args.memory_retrieval is not None:
        out["retrieval"] = args.memory_retrieval
    if args.memory_topk is not None:
        out["topk"] = args.memory_topk
    if args.memory_index is not None:
        out["faiss_index"] = args.memory_index
    if args.memory_nprobe is not None:
        out["nprobe"] = args.memory_nprobe
    return out


def _export_hf(args) -> int:
    from .model import export_hf, latest_checkpoint, load_model

    run_dir = Path(args.run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    model, _ = load_model(ckpt)
    out = export_hf(model, args.out_dir, overwrite=args.force)
    print(f"wrote {out} (LlamaForCausalLM, from {ckpt}); load it with transformers'")
    print(f"from_pretrained('{out}') or longctx.model.from_hf('{out}')")
    if model.cfg.attention.kind != "dense":
        backend = {"dilated": "longctx_dilated", "sliding_window": "longctx_sliding"}
        print(
            f"its attention is {model.cfg.attention.kind!r}: import longctx.hf and load with "
            f"attn_implementation='{backend[model.cfg.attention.kind]}'"
        )
    return 0


def _import_hf(args) -> int:
    from .model import from_hf, save_checkpoint
    from .train.config import RunConfig

    run_dir = Path(args.run_dir)
    if (run_dir / "checkpoints").exists():
        raise FileExistsError(f"{run_dir} already holds a run; choose a new directory")
    model = from_hf(args.source)
    cfg = RunConfig.from_dict(
        {"model": model.cfg.to_dict(), "train": {"context": args.context}, "data": {}}
    )
    meta = {"tokens": 0, "config": cfg.to_dict(), "imported_from": str(args.source)}
    ckpt = save_checkpoint(run_dir / "checkpoints", 0, {"model": model.state_dict()}, meta)
    print(f"wrote {ckpt} ({model.num_params():,} parameters, {model.cfg.attention.kind} attention)")
    print(f"longctx eval, generate, info and bench take {run_dir} as a run directory")
    return 0


def _hf_parsers(sub) -> None:
    p = sub.add_parser(
        "export-hf", help="write a run's model as a Hugging Face LlamaForCausalLM directory"
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    p.set_defaults(func=_export_hf)
    p = sub.add_parser(
        "import-hf",
        help="make a run directory from a local Llama-architecture checkpoint (config.json + "
        "safetensors)",
    )
    p.add_argument("source", help="a checkpoint directory (nothing is downloaded)")
    p.add_argument("run_dir")
    p.add_argument(
        "--context", type=int, default=2048, help="the context the run records (eval's 1x)"
    )
    p.set_defaults(func=_import_hf)


def _retro_build(args) -> int:
    from .retro import RetroDB

    try:
        db = RetroDB.build(
            args.source,
            args.out,
            chunk=args.chunk,
            embedder=args.embedder,
            checkpoint=args.embedder_checkpoint,
            val_percent=args.val_percent,
            max_bytes=args.max_bytes,
            overwrite=args.force,
        )
    except FileExistsError as exc:
        raise FileExistsError(f"{exc} (--force replaces it)") from None
    m = db.manifest
    print(
        f"wrote {db.path}: {len(db):,} chunks of {db.chunk} tokens from {m['documents']:,} "
        f"documents ({m['source']['description']}, training split), keys "
        f"{m['embedder']['kind']} {m['key_dim']}-d, in {m['build_seconds']:.1f} s"
    )
    return 0


def _retro_info(args) -> int:
    import json

    from .retro import RetroDB

    print(json.dumps(RetroDB.open(args.db).info(), indent=2))
    return 0


def _retro_search(args) -> int:
    import numpy as np
    import torch

    from .data.tokenizer import PAD, decode, encode
    from .retro import RetroDB

    db = RetroDB.open(args.db)
    ids = encode(args.text)[: db.chunk].astype(np.int64)
    if len(ids) == 0:
        raise ValueError("--text is empty")
    query = np.full((1, db.chunk), PAD, dtype=np.int64)
    query[0, : len(ids)] = ids
    scores, found = db.search(db.embed(torch.from_numpy(query)), args.k, index=args.index)
    for score, i in zip(scores[0].tolist(), found[0].tolist(), strict=True):
        if i < 0:
            break
        text = decode(db.tokens[i])
        print(f"{score:.3f}  chunk {i:,} (document {int(db.docs[i]):,}): {text!r}")
    return 0


def _retro_recall(args) -> int:
    import time

    import numpy as np
    import torch

    from .retro import RetroDB

    db = RetroDB.open(args.db)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, len(db), (args.queries,), generator=g).numpy()
    queries = db.embed(torch.from_numpy(db.tokens[ids].astype(np.int64)))
    t = time.perf_counter()
    db.faiss_index(args.index)
    built = time.perf_counter() - t
    times = {}
    for kind in ("exact", args.index):
        t = time.perf_counter()
        db.search(queries, args.k, index=kind)
        times[kind] = 1000 * (time.perf_counter() - t) / len(queries)
    recall = db.recall(args.index, queries, args.k)
    print(
        f"{args.index}: recall@{args.k} {recall:.3f} against exact over {args.queries} "
        f"database chunks; {times[args.index]:.3f} ms per query (exact "
        f"{times['exact']:.3f}); index built in {built:.1f} s"
    )
    return 0


def _retro_parsers(sub) -> None:
    from .retro.db import INDEXES

    retro = sub.add_parser("retro", help="RETRO: the retrieval database")
    rsub = retro.add_subparsers(dest="retro", metavar="COMMAND", required=True)
    p = rsub.add_parser(
        "build-db",
        help="chunk a corpus's training split, key each chunk with a frozen embedder",
    )
    p.add_argument("--source", default="stdlib", help="as data.source (default stdlib)")
    p.add_argument("--out", required=True, help="the database directory")
    p.add_argument("--chunk", type=int, default=64, help="tokens per chunk (default 64)")
    p.add_argument("--embedder", choices=["sketch", "model"], default="sketch")
    p.add_argument("--embedder-checkpoint", help="with --embedder model: a run or checkpoint")
    p.add_argument("--val-percent", type=float, default=5.0, help="as data.val_percent")
    p.add_argument("--max-bytes", type=int, default=0, help="as data.max_bytes")
    p.add_argument("--force", action="store_true", help="replace an existing database")
    p.set_defaults(func=_retro_build)
    p = rsub.add_parser("info", help="a database's manifest and size")
    p.add_argument("db")
    p.set_defaults(func=_retro_info)
    p = rsub.add_parser("search", help="the nearest chunks of a text")
    p.add_argument("db")
    p.add_argument("--text", required=True, help="a query (its first chunk is used)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--index", choices=INDEXES, default="exact", help="exact, or a faiss index")
    p.set_defaults(func=_retro_search)
    p = rsub.add_parser(
        "recall", help="a faiss index's recall against exact search, and time per query"
    )
    p.add_argument("db")
    p.add_argument("--index", choices=INDEXES[1:], default="ivf")
    p.add_argument("--queries", type=int, default=256, help="database chunks used as queries")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_retro_recall)


def _info(args) -> int:
    import json

    from .evaluate import run_info

    info = run_info(Path(args.run_dir))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["config"]["model"]
    fl = info["flops_per_token"]
    print(f"checkpoint: {info['checkpoint']} (step {info['step']}, {info['tokens']:,} tokens)")
    print(
        f"model: {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, "
        f"attention {m['attention']['kind']}, feed-forward {m['ffn']['kind']}"
    )
    print(
        f"parameters: {info['parameters']:,} ({info['non_embedding_parameters']:,} non-embedding)"
    )
    print(
        f"FLOPs per token at context {info['context']:,}: forward {fl['forward'] / 1e6:.2f} M "
        f"(attention {fl['attention_forward'] / 1e6:.2f} M), training ~{fl['train'] / 1e6:.2f} M"
    )
    print("config:")
    print(json.dumps(info["config"], indent=2))
    return 0


# --------------------------------------------------------------------------- generate


def _generate(args) -> int:
    from .textgen import generate_text

    if args.prompt_file is not None:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    result = generate_text(
        Path(args.run_dir),
        prompt,
        max_new_tokens=args.max_new_tokens,
        cache=args.cache,
        recompute_chunk=args.recompute_chunk,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stop_at_eod=not args.no_stop_at_eod,
        checkpoint=args.checkpoint,
        stats_path=args.stats,
        device=args.device,
        memory=_memory_options(args),
    )
    n = len(result.tokens)
    cache_mib = (result.cache_bytes[-1] / 2**20) if result.cache_bytes else 0.0
    print(
        f"[{n} tokens, prefill {result.prefill_seconds:.2f} s, {result.tokens_per_s:.1f} "
        f"tokens/s, cache {cache_mib:.2f} MiB ({args.cache}), stopped by {result.stopped_by}]",
        file=sys.stderr,
    )
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    return 0


def _bench(args) -> int:
    args.bench_run(args)
    return 0


def _import(name: str) -> None:
    """Import a user module (``--import``); the current directory is searched too."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"--import {name}: {exc}") from None


# --------------------------------------------------------------------------- parser


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Only the benchmark named in ``argv`` (if any) is imported."""
    parser = argparse.ArgumentParser(
        prog="longctx", description="Long-context attention: benchmarks and tools."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a Python module first, e.g. one that registers your own attention "
        "pattern (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _eval_parser(sub)
    p = sub.add_parser("info", help="a run's config, parameter count and FLOPs per token")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)
    _generate_parser(sub)
    _hf_parsers(sub)
    _retro_parsers(sub)
    _compare_parser(sub)
    _bench_parser(sub, argv[1] if argv and len(argv) > 1 and argv[0] == "bench" else None)
    return parser


def _train_parser(sub) -> None:
    from .config import preset_names

    p = sub.add_parser(
        "train",
        help="train a long-context LM (default: the tiny preset on the Python stdlib)",
        description="Train a decoder LM. With no arguments: the 'tiny' preset on the built-in "
        "corpus (the running Python's standard library), about 10 minutes on 2 CPU cores, "
        "then an evaluation.",
    )
    p.add_argument("--preset", choices=preset_names(), help="a shipped preset (default tiny)")
    p.add_argument("--config", type=Path, help="a TOML file with [model], [train], [data]")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.max_steps=200",
    )
    p.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--checkpoint", type=Path, help="with --resume: this checkpoint directory")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="P",
        help="split each sequence over P ranks (launch with torchrun; the remaining ranks "
        "are data parallel)",
    )
    p.add_argument(
        "--sp-strategy",
        choices=["longnet", "ulysses", "ring"],
        help="sequence-parallel strategy (default: longnet for dilated, ring for dense, "
        "ulysses otherwise)",
    )
    p.add_argument(
        "--sp-timeout",
        type=float,
        default=120.0,
        help="seconds a rank waits for the others before failing with an error",
    )
    _device_option(p)
    p.set_defaults(func=_train)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run: bits per byte by position and context")
    p.add_argument("run_dir")
    p.add_argument(
        "--contexts",
        help="comma-separated context lengths (default: 1x, 2x, 4x the training context)",
    )
    p.add_argument("--windows", type=int, default=64, help="validation windows per context")
    p.add_argument(
        "--baseline",
        help="retro: a run without retrieval, on the same chunks; longmem: a control run "
        "(e.g. the SideNet with memory off)",
    )
    p.add_argument(
        "--segments", type=int, default=8, help="longmem: segments per validation document"
    )
    p.add_argument("--retro-k", type=int, help="retro: neighbours per chunk (default: the model's)")
    p.add_argument(
        "--task",
        choices=["bpb", "passkey", "kv-retrieval", "retro", "longmem"],
        default="bpb",
        help="bpb (default), a retrieval task swept over --lengths x --depths, retro "
        "(a RETRO run: with/without retrieval, N or F only, leakage curve, oracle) or "
        "longmem (a LongMem run: bits per byte by segment against its backbone and "
        "--baseline)",
    )
    p.add_argument("--lengths", default="1024,4096,16384", help="retrieval: context lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="retrieval: needle depths")
    p.add_argument("--trials", type=int, default=20, help="retrieval: trials per cell")
    p.add_argument("--seed", type=int, default=0)
    _memory_arguments(p, "each context length")
    _device_option(p)
    p.set_defaults(func=_eval)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run (streamed)")
    p.add_argument("run_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument(
        "--cache",
        choices=["full", "dilated", "none", "recompute"],
        default="full",
        help="KV cache policy (dilated: bounded exact cache of dilated layers; recompute: "
        "no cache, memory flat in the context, time about (N / chunk) ** layers)",
    )
    p.add_argument(
        "--recompute-chunk",
        type=int,
        default=256,
        help="positions per recomputed chunk with --cache recompute",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop after this text")
    p.add_argument(
        "--no-stop-at-eod", action="store_true", help="do not stop at the end-of-document token"
    )
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default latest)")
    p.add_argument("--stats", type=Path, help="write per-step latency and cache bytes (JSONL)")
    _memory_arguments(p, "the prompt plus --max-new-tokens")
    _device_option(p)
    p.set_defaults(func=_generate)


def _capacity(text: str):
    if text == "fit":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'fit', got {text!r}")
    return value


def _memory_arguments(p, fit: str) -> None:
    """Runtime memory options of a memory (Focused Transformer) or LongMem model."""
    from .nn.retrieval import FAISS_INDEXES, RETRIEVALS

    g = p.add_argument_group(
        "memory and LongMem models (memory is not a parameter: set at run time)"
    )
    g.add_argument(
        "--memory-capacity",
        type=_capacity,
        help=f"entries per memory layer and row; 'fit' = {fit} (default: the training value)",
    )
    g.add_argument(
        "--memory-retrieval",
        choices=RETRIEVALS,
        help="dense, topk (exact) or faiss (an index kept as memory is written; default: "
        "the training value)",
    )
    g.add_argument(
        "--memory-topk",
        type=int,
        help="entries (LongMem: token pairs) each query reads with topk or faiss retrieval "
        "(default: the training value)",
    )
    g.add_argument(
        "--memory-index",
        choices=FAISS_INDEXES,
        help="faiss index: ivf (approximate, sublinear per query; default) or flat (exact)",
    )
    g.add_argument(
        "--memory-nprobe",
        type=int,
        help="lists an ivf query scans (default: 3 sqrt(lists)); more is slower and closer "
        "to exact",
    )


def _compare_parser(sub) -> None:
    from .compare.plan import DEFAULT_PRESETS, Settings

    d = Settings()
    p = sub.add_parser(
        "compare",
        help="train every method on the same data and budget; one table of every figure",
        description="Train each preset for the same wall-clock budget on the same data and "
        "seed, measure each the same way (bits per byte at 1x and 4x the training context "
        "and by position, kv-retrieval, training and decoding cost) and write table.md, "
        "results.json and compare.png. Run it again in the same --out to resume: finished "
        "presets are reused, an interrupted one continues.",
    )
    p.add_argument(
        "--presets",
        help=f"comma-separated presets (default: {','.join(DEFAULT_PRESETS)})",
    )
    p.add_argument(
        "--minutes", type=float, default=d.minutes, help="training budget per preset (wall clock)"
    )
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="the comparison's folder")
    p.add_argument("--data", default=d.data, help="data.source of every run (default stdlib)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--windows", type=int, default=d.windows, help="validation windows per context length"
    )
    p.add_argument(
        "--lengths",
        default=",".join(str(n) for n in d.lengths),
        help="kv-retrieval context lengths",
    )
    p.add_argument(
        "--trials", type=int, default=d.trials, help="kv-retrieval trials per (length, depth)"
    )
    p.add_argument(
        "--decode-context",
        type=int,
        default=d.decode_context,
        help="decoding is timed after a prompt of this many tokens",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value of every preset (after the comparison's own)",
    )
    _device_option(p)
    p.set_defaults(func=_compare)


def _compare(args) -> int:
    from ._util import parse_numbers
    from .compare import Settings, parse_presets, run_comparison
    from .compare.report import JSON, PNG, TABLE

    settings = Settings(
        minutes=args.minutes,
        data=args.data,
        seed=args.seed,
        windows=args.windows,
        lengths=tuple(parse_numbers(args.lengths, int, "--lengths", positive=True)),
        trials=args.trials,
        decode_context=args.decode_context,
        overrides=tuple(args.set),
    )
    presets = parse_presets(args.presets)
    try:
        result = run_comparison(presets, settings, args.out, device=args.device)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: run the same command again to resume (finished presets are "
            f"reused); partial table: {args.out / TABLE}",
            file=sys.stderr,
        )
        return 130
    print()
    print((args.out / TABLE).read_text())
    failed = [n for n, f in result["results"].items() if "error" in f]
    print(f"table: {args.out / TABLE}\nresults: {args.out / JSON}\nplot: {args.out / PNG}")
    if failed:
        print(f"failed: {', '.join(failed)} (see the table's Failures)", file=sys.stderr)
    return 1 if failed else 0


def _device_option(p) -> None:
    from ._util import DEVICE_HELP

    p.add_argument("--device", default="auto", help=f"where to run: {DEVICE_HELP}")


def _bench_parser(sub, wanted: str | None) -> None:
    """``bench NAME``: every benchmark is listed; only ``wanted`` (or all, when none is
    named) is imported to declare its options."""
    bench = sub.add_parser("bench", help="benchmarks (time, memory, FLOP/s vs N)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        if wanted is not None and name != wanted:
            bench_sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"longctx.bench.{module_name}")
        p = bench_sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=_bench, bench_run=module.run)


def main(argv: list[str] | None = None) -> int:
    """Run the ``longctx`` command with ``argv`` (default: the process's arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        for name in args.imports:
            _import(name)
        return args.func(args)
    # bad input or a missing optional dependency: a clear message, no traceback
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"longctx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

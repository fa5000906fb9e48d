"""The ``longctx`` command: maps subcommands to functions, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _generate(args) -> int:
    from .generation import generate_text

    if args.prompt_file is not None:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
    else:
        prompt = args.prompt
    result = generate_text(
        Path(args.run_dir),
        prompt,
        max_new_tokens=args.max_new_tokens,
        cache=args.cache,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        stop_at_eod=not args.no_stop_at_eod,
        checkpoint=args.checkpoint,
        stats_path=args.stats,
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


def _run_bench(args) -> int:
    args.bench_run(args)
    return 0


def _train(args) -> int:
    from .train import prepare_run, resolve_config, train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sequence_parallel > 1 or world > 1:
        return _train_parallel(args)
    if args.resume:
        run_dir = _resume_dir(args)
        cfg = prepare_run(run_dir, None, True, args.set)
    else:
        cfg = resolve_config(args.preset, args.config, args.set)
        run_dir = Path(args.out or _default_run_dir(args))
        prepare_run(run_dir, cfg, False)
    print(f"run directory: {run_dir}")
    result = train(cfg, run_dir, resume=args.resume, checkpoint=args.checkpoint)
    rc = _report(result, run_dir)
    if rc == 0 and not args.no_eval:
        _after_training_eval(run_dir)
    return rc


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


def _train_parallel(args) -> int:
    """Under torchrun: sequence parallelism over --sequence-parallel ranks, data
    parallelism over the rest. Rank 0 writes the run directory and prints."""
    import torch.distributed as dist

    from .distributed.training import setup_training
    from .train import prepare_run, resolve_config, train

    if args.resume:
        run_dir = _resume_dir(args)
        cfg = prepare_run(run_dir, None, True, args.set)  # same file, same content: any rank
    else:
        cfg = resolve_config(args.preset, args.config, args.set)
    par = setup_training(
        args.sequence_parallel,
        args.sp_strategy,
        cfg.model,
        cfg.train.context,
        timeout_s=args.sp_timeout,
    )
    try:
        if not args.resume:
            box = [args.out or _default_run_dir(args), None]
            if par.is_main:
                try:
                    prepare_run(Path(box[0]), cfg, False)
                except ValueError as exc:
                    box[1] = str(exc)
            dist.broadcast_object_list(box, src=0)  # one name, and rank 0's verdict
            if box[1] is not None:
                raise ValueError(box[1])
            run_dir = Path(box[0])
        if par.is_main:
            sp = par.sp
            print(
                f"run directory: {run_dir}\nsequence parallel: {sp.size} ranks, strategy "
                f"{sp.strategy} ({sp.layout} layout); data parallel: {par.dp_size} replica(s)"
            )
        result = train(cfg, run_dir, resume=args.resume, checkpoint=args.checkpoint, parallel=par)
        is_main = par.is_main
    except RuntimeError as exc:  # gloo/NCCL report a lost peer or a timeout this way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"longctx: error: rank {dist.get_rank()}: a collective failed ({first}); another "
            f"rank probably died or timed out (--sp-timeout {args.sp_timeout:g} s)",
            file=sys.stderr,
        )
        return 1
    finally:
        dist.destroy_process_group()
    if not is_main:
        return 0 if result.stopped_by != "interrupt" else 130
    rc = _report(result, run_dir)
    if rc == 0 and not args.no_eval:
        _after_training_eval(run_dir)
    return rc


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
    print(f"  results: {Path(res['run_dir']) / 'eval' / 'eval.json'}")
    for p in res["plots"]:
        print(f"  plot: {p}")


def _after_training_eval(run_dir: Path, trials: int = 20) -> None:
    """Bits per byte on the corpus; for a run trained on a synthetic task, a short
    retrieval evaluation of that task (the full sweep is ``longctx eval --task``)."""
    from .data.tasks import task_source
    from .evaluate import evaluate_run

    cfg = json.loads((run_dir / "config.json").read_text())
    task = task_source(cfg["data"]["source"])
    if task is None:
        _print_eval(evaluate_run(run_dir))
        return
    ctx = int(cfg["train"]["context"])
    args = argparse.Namespace(
        run_dir=str(run_dir),
        task=task,
        lengths=f"{ctx},{8 * ctx}",
        depths="0,0.5,1",
        trials=trials,
        seed=0,
    )
    _eval_retrieval(args)


def _eval(args) -> int:
    from .evaluate import evaluate_run

    if args.task != "bpb":
        return _eval_retrieval(args)
    contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else None
    _print_eval(evaluate_run(Path(args.run_dir), contexts=contexts, windows=args.windows))
    return 0


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def _eval_retrieval(args) -> int:
    from .evaluate.retrieval import evaluate_retrieval, write_results
    from .model.checkpoint import latest_checkpoint, load_model

    run_dir = Path(args.run_dir)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    model, _ = load_model(ckpt)
    lengths = _numbers(args.lengths, int, "--lengths")
    depths = _numbers(args.depths, float, "--depths")
    result = evaluate_retrieval(model, args.task, lengths, depths, args.trials, seed=args.seed)
    result["checkpoint"] = str(ckpt)
    js, png = write_results(result, run_dir / "eval", f"{args.task}: {run_dir.name}")
    print(f"\n{args.task} exact match ({args.trials} trials per cell, 95% Wilson interval):")
    for length, r in result["by_length"].items():
        lo, hi = r["ci95"]
        acc = f"{r['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]"
        print(f"  context {int(length):>7,}: {acc} ({r['trials']} trials)")
    print(f"  results: {js}\n  heatmap: {png}")
    return 0


def _info(args) -> int:
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
        f"attention {m['attention']}"
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


def build_parser() -> argparse.ArgumentParser:
    from .bench import attention
    from .bench import colt5 as bench_colt5
    from .bench import generate as bench_generate
    from .bench import parallel as bench_parallel
    from .bench import train as bench_train

    parser = argparse.ArgumentParser(
        prog="longctx", description="Long-context attention: benchmarks and tools."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run: bits per byte by position and context")
    p.add_argument("run_dir")
    p.add_argument(
        "--contexts",
        help="comma-separated context lengths (default: 1x, 2x, 4x the training context)",
    )
    p.add_argument("--windows", type=int, default=64, help="validation windows per context")
    p.add_argument(
        "--task",
        choices=["bpb", "passkey", "kv-retrieval"],
        default="bpb",
        help="bpb (default), or a retrieval task swept over --lengths x --depths",
    )
    p.add_argument("--lengths", default="1024,4096,16384", help="retrieval: context lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="retrieval: needle depths")
    p.add_argument("--trials", type=int, default=20, help="retrieval: trials per cell")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_eval)

    p = sub.add_parser("info", help="a run's config, parameter count and FLOPs per token")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser("generate", help="generate text from a trained run (streamed)")
    p.add_argument("run_dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument(
        "--cache",
        choices=["full", "dilated", "none"],
        default="full",
        help="KV cache policy (dilated: bounded exact cache of dilated layers)",
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
    p.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks (time, memory, FLOP/s vs N)")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    benches = [
        (
            "attention",
            attention,
            "attention ops vs N: time, useful GFLOP/s, peak memory",
        ),
        (
            "train",
            bench_train,
            "training tokens/s and peak memory vs context: dense vs dilated vs sliding",
        ),
        (
            "generate",
            bench_generate,
            "decoding latency and cache bytes vs context for the three cache policies",
        ),
        (
            "colt5",
            bench_colt5,
            "CoLT5 routed feed-forward and attention vs dense: time and FLOPs vs N",
        ),
        (
            "parallel",
            bench_parallel,
            "sequence-parallel strategies on gloo: bytes per rank and time vs N and P",
        ),
    ]
    for name, module, help_text in benches:
        p = bench_sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=_run_bench, bench_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: a clear message, no traceback
        print(f"longctx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

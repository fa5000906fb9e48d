"""Training: AdamW, warmup + cosine schedule, clipping, accumulation, bf16 autocast,
checkpoints that resume exactly, Ctrl-C that saves first."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import apply_overrides
from ..data import Corpus, load_corpus
from ..data.corpus import eval_windows, sample_batch
from ..data.tasks import TaskData, task_source
from ..model import DecoderLM
from ..model.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from ..model.lm import LN2, bits_per_position
from .config import RunConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_train_bpb: float | None
    val_bpb: float | None
    unigram_bpb: float
    stopped_by: str
    checkpoint: Path
    unit: str = "bits/byte"  # of val_bpb and unigram_bpb ("bits/target token" for tasks)
    baseline: str = "unigram baseline"  # what unigram_bpb is ("no-retrieval chance" for tasks)


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: DecoderLM, cfg) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, meta = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                meta[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": meta}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class _StopFlag:
    """First Ctrl-C: finish the current step, save, stop. Second: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            tqdm.write(
                "\ninterrupt: finishing this step, saving a checkpoint, then stopping "
                "(Ctrl-C again to stop at once)"
            )

        with contextlib.suppress(ValueError):  # not the main thread: no handler
            self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def evaluate_bpb(model: DecoderLM, windows: list[torch.Tensor], batch: int) -> float:
    """Mean bits per token (= per byte: tokens are bytes) over validation windows."""
    return float(bits_per_position(model, windows, batch).mean())


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint (they will be produced again)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


@torch.no_grad()
def evaluate_targets(model: DecoderLM, batches) -> float:
    """Mean bits per target token (targets -100 excluded) over (inputs, targets) batches,
    with the model's inference forward (memory models: window by window, with memory)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        logits = model(x)
        total += float(F.cross_entropy(logits.transpose(1, 2), y, reduction="sum"))
        count += int((y >= 0).sum())
    model.train(was)
    return total / max(count, 1) / LN2


def prepare_run(
    run_dir: Path, cfg: RunConfig | None, resume: bool, overrides: list[str] = ()
) -> RunConfig:
    """Fresh run: write config.json (refusing to overwrite another run). Resume: read it,
    apply any --set overrides (e.g. a larger train.max_steps)."""
    cfg_path = run_dir / CONFIG_FILE
    if resume:
        if not cfg_path.exists():
            raise ValueError(f"--resume: {run_dir} has no {CONFIG_FILE}; is it a run directory?")
        data = json.loads(cfg_path.read_text())
        cfg = RunConfig.from_dict(apply_overrides(data, list(overrides)))
    else:
        if cfg_path.exists():
            raise ValueError(
                f"{run_dir} already holds a run; use --resume to continue it or choose "
                "another --out"
            )
        assert cfg is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = cfg_path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    os.replace(tmp, cfg_path)
    return cfg


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    checkpoint: Path | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
    parallel=None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns where it stopped and the numbers.

    ``parallel``: a ``longctx.distributed.training.ParallelTraining`` (under torchrun):
    sequence shards per rank, gradients reduced over ranks; only rank 0 writes."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _train(cfg, run_dir, resume, checkpoint, corpus, progress, parallel)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, run_dir, resume, checkpoint, corpus, progress, par) -> TrainResult:
    tc = cfg.train
    task = task_source(cfg.data.source)
    if task is not None:  # synthetic sequences with targets only where the loss is
        if par is not None:
            raise ValueError("a task data source trains without sequence parallelism")
        data = TaskData(
            task,
            cfg.model.memory_window,
            question_fraction=cfg.data.task_questions,
            local_fraction=cfg.data.task_local,
            targets=cfg.data.task_targets,
            near_fraction=cfg.data.task_near,
        )
        n_val = max(1, -(-tc.eval_windows // tc.batch_size))
        val = [data.batch(tc.batch_size, tc.context, tc.seed, i, "val") for i in range(n_val)]
        unigram = data.chance_bits(tc.context)

        def next_batch(index):
            return data.batch(tc.batch_size, tc.context, tc.seed, index)

    else:
        corpus = corpus or load_corpus(cfg.data)
        val = eval_windows(corpus.val, tc.context, tc.eval_windows)
        unigram = corpus.unigram_bits_per_token()

        def next_batch(index):
            return sample_batch(corpus.train, tc.batch_size, tc.context, tc.seed, index)

    unit = "bits/target token" if task is not None else "bits/byte"
    baseline = "no-retrieval chance" if task is not None else "unigram baseline"
    metrics = run_dir / METRICS_FILE
    ckpt_root = run_dir / CKPT_DIR

    main = par is None or par.is_main
    progress = progress and main
    torch.manual_seed(tc.seed)
    model = DecoderLM(cfg.model)
    if par is not None:
        par.sp.parallelize(model)
    opt = build_optimizer(model, tc)
    dp = 1 if par is None else par.dp_size

    def val_bpb_now() -> float:
        if task is not None:
            return evaluate_targets(model, val)
        if par is None:
            return evaluate_bpb(model, val, tc.batch_size)
        return par.evaluate_bpb(model, val, tc.batch_size)

    step, tokens = 0, 0
    if resume:
        path = checkpoint or latest_checkpoint(ckpt_root)
        loaded, state = load_checkpoint(path, ["model", "optimizer", "rng"])
        try:
            model.load_state_dict(loaded["model"])
            _load_optimizer(opt, loaded["optimizer"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {exc}") from None
        torch.set_rng_state(loaded["rng"]["cpu"])
        step, tokens = int(state["step"]), int(state["tokens"])
        if main:
            _truncate_metrics(metrics, step)
            print(f"resumed from {path} at step {step} ({tokens:,} tokens)")

    def save() -> Path:
        if par is not None:  # written once, by rank 0; the others wait for it
            path = _save() if main else ckpt_root / f"step-{step:08d}"
            par.barrier()
            return path
        return _save()

    def _save() -> Path:
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        path = save_checkpoint(
            ckpt_root,
            step,
            {
                "model": model.state_dict(),
                "optimizer": opt_tensors,
                "rng": {"cpu": torch.get_rng_state()},
            },
            {"tokens": tokens, "config": cfg.to_dict(), "optimizer": opt_meta},
        )
        prune_checkpoints(ckpt_root, tc.keep_checkpoints)
        return path

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.bf16 else contextlib.nullcontext()
    tokens_per_step = tc.batch_size * tc.context * tc.grad_accum * dp
    start_time = time.monotonic()
    window_time, window_tokens = time.monotonic(), 0
    stopped_by = "max_steps"
    last_loss = None
    val_bpb = None
    ckpt_path = None
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", unit="step", disable=not progress)
    model.train()
    with _StopFlag() as stop:
        while step < tc.max_steps:
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum, aux_sum = 0.0, None
            negatives = tc.crossbatch.at(step)  # memory models: crossbatch negatives
            for micro in range(tc.grad_accum):
                index = (
                    step * tc.grad_accum + micro
                    if par is None
                    else par.batch_index(step, micro, tc.grad_accum)
                )
                x, y = next_batch(index)
                with autocast:
                    if par is None:
                        lm, aux = model.loss_parts(x, y, crossbatch=negatives)
                    else:
                        lm, aux = par.local_loss(model, x, y), None
                    loss = lm if aux is None else lm + model.cfg.colt5_aux_weight * aux
                (loss / tc.grad_accum).backward()
                loss_sum += float(lm.detach()) / tc.grad_accum
                if aux is not None:
                    aux_sum = (aux_sum or 0.0) + float(aux.detach()) / tc.grad_accum
            if par is not None:
                par.all_reduce_grads(model)
                (loss_sum,) = par.replica_mean([loss_sum])
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"loss is {loss_sum} at step {step}; lower train.lr or enable grad_clip"
                )
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
                if tc.grad_clip
                else None
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss_sum
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.monotonic()
                tok_s = window_tokens / max(now - window_time, 1e-9)
                window_time, window_tokens = now, 0
                row = {
                    "step": step,
                    "tokens": tokens,
                    "loss": loss_sum,
                    "bpb": loss_sum / LN2,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tok_s,
                    "elapsed_s": now - start_time,
                }
                if negatives is not None:
                    row["crossbatch_negatives"] = negatives
                routed = model.routed_fractions()
                if routed:  # CoLT5: the fraction each router sent to its heavy branch
                    row["router_aux_loss"] = aux_sum
                    row["routed_fraction"] = routed
                if main:
                    _append(metrics, row)
                post = {"loss": f"{loss_sum:.3f}", "bpb": f"{loss_sum / LN2:.3f}"}
                if routed:
                    post["routed"] = f"{sum(routed.values()) / len(routed):.3f}"
                bar.set_postfix(**post, tok_s=f"{tok_s:,.0f}")
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.max_steps:
                val_bpb = val_bpb_now()
                if main:
                    _append(metrics, {"step": step, "tokens": tokens, "val_bpb": val_bpb})
                    bar.write(
                        f"step {step}: validation {val_bpb:.3f} {unit} ({baseline} {unigram:.3f})"
                    )
            if step % tc.save_every == 0:
                ckpt_path = save()
            interrupted = stop.requested
            late = bool(tc.max_minutes) and time.monotonic() - start_time >= 60 * tc.max_minutes
            if par is not None:  # every rank must take the same decision
                interrupted, late = par.any(interrupted), par.any(late)
            if interrupted:
                stopped_by = "interrupt"
                break
            if tc.max_tokens and tokens >= tc.max_tokens:
                stopped_by = "max_tokens"
                break
            if late:
                stopped_by = "max_minutes"
                break
    bar.close()
    if ckpt_path is None or ckpt_path.name != f"step-{step:08d}":
        ckpt_path = save()
    if stopped_by != "interrupt":
        val_bpb = val_bpb_now()
        if main:
            row = {"step": step, "tokens": tokens, "val_bpb": val_bpb, "final": True}
            _append(metrics, row)
    return TrainResult(
        run_dir=run_dir,
        step=step,
        tokens=tokens,
        final_train_bpb=None if last_loss is None else last_loss / LN2,
        val_bpb=val_bpb,
        unigram_bpb=unigram,
        stopped_by=stopped_by,
        checkpoint=ckpt_path,
        unit=unit,
        baseline=baseline,
    )

"""Training in parts: :class:`Trainer` builds a run (data, model, optimiser), takes
optimisation steps (:meth:`Trainer.train_step`), evaluates (:meth:`Trainer.evaluate`) and
saves (:meth:`Trainer.save`); :meth:`Trainer.run` is the loop that calls them, logs, and
stops on a limit or Ctrl-C. How the work is spread over processes is one object
(:mod:`longctx.train.parallel`): the loop never branches on it.

Checkpoints resume exactly (batches depend only on (seed, step)); Ctrl-C finishes the
step, saves and stops."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .._util import (
    Progress,
    append_jsonl,
    atomic_write,
    atomic_write_json,
    nats_to_bits,
    peak_memory,
    resolve_device,
)
from ..config import apply_overrides
from ..data import Corpus, stream_source, training_source
from ..model import DecoderLM
from ..model.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from ..model.longmem import load_backbone
from ..nn.state import ModelState
from .config import RunConfig
from .optim import build_optimizer, load_optimizer, lr_at, optimizer_tensors
from .parallel import Parallel, SingleProcess

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CKPT_DIR = "checkpoints"
LONGMEM_VAL_SEGMENTS = 4  # a LongMem run validates on sequences of this many segments


@dataclass
class TrainResult:
    """Where a run stopped and its numbers."""

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
    seconds: float = 0.0  # training time of the run (across resumes; what max_minutes counts)
    model: DecoderLM | None = None  # the trained model (as in ``checkpoint``)
    corpus: Corpus | None = None  # the text it trained on (None for a task source)


@dataclass
class StepStats:
    """What one optimisation step measured."""

    loss: float  # cross-entropy, nats per target token (mean over the step's batches)
    router_aux: float | None  # the routers' auxiliary loss (None without routers)
    lr: float
    grad_norm: float | None
    negatives: int | None  # crossbatch negatives (None: off)


@torch.no_grad()
def validation_bits(model: DecoderLM, batches, parallel: Parallel) -> float:
    """Mean bits per target token (targets -100 excluded; tokens are bytes, so bits per
    byte for text) over (inputs, targets) batches, with the model's inference forward."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y, *extra in batches:  # extra: a RETRO batch's neighbours
        xl, yl, positions, _ = parallel.shard(to_device(x, device), to_device(y, device))
        n = int((y >= 0).sum())
        nb = to_device(extra[0], device) if extra else None
        terms = model.loss_terms(xl, yl, positions=positions, normalizer=n, neighbours=nb)
        total += float(terms.lm) * n
        count += n
    model.train(was)
    (total,) = parallel.mean([total])
    return nats_to_bits(total / max(count, 1))


class Trainer:
    """One training run (module docstring). Build it, optionally :meth:`resume`, then
    :meth:`run`; or drive :meth:`train_step`, :meth:`evaluate` and :meth:`save`."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        parallel: Parallel | None = None,
        corpus: Corpus | None = None,
        progress: bool = True,
        device=None,
    ):
        tc = cfg.train
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.par = parallel or SingleProcess()
        self.device = resolve_device(device)
        longmem = cfg.model.longmem
        common = dict(
            batch=tc.batch_size,
            context=tc.context,
            seed=tc.seed,
            eval_windows=tc.eval_windows,
            corpus=corpus,
        )
        if longmem.enabled:  # rows continue their documents from step to step
            self._check_longmem(cfg)
            val_length = max(tc.context, LONGMEM_VAL_SEGMENTS * longmem.segment)
            self.source = stream_source(cfg.data, val_length=val_length, **common)
        else:
            self.source = training_source(cfg.data, **common)
        if cfg.data.retro_db:  # RETRO: every batch carries its sequences' neighbours
            from ..retro.source import retro_source

            self.source = retro_source(self.source, cfg)
        elif cfg.model.retro.enabled:
            raise ValueError(
                "model.retro.layers needs a retrieval database: build one with longctx retro "
                "build-db and set data.retro_db"
            )
        torch.manual_seed(tc.seed)
        self.model = DecoderLM(cfg.model)  # initialised on the CPU: any device
        if cfg.model.retro.base:  # RETROfit: a trained decoder, frozen; retrieval trains
            from ..retro.fit import retrofit

            retrofit(self.model, cfg.model.retro.base)
        if longmem.enabled:  # the backbone, frozen; the SideNet starts from it
            load_backbone(self.model, longmem.backbone)
        self.streams: dict[int, ModelState] = {}  # LongMem: each micro-batch's rows
        self.model.to(self.device)
        self.model.set_activation_checkpointing(tc.activation_checkpointing, tc.token_chunk)
        self.par.prepare(self.model)
        self.opt = build_optimizer(self.model, tc)
        self.step, self.tokens = 0, 0
        self._seconds_before = 0.0  # training time of earlier processes (resumed runs)
        self._clock = time.monotonic()
        self.tokens_per_step = tc.batch_size * tc.context * tc.grad_accum * self.par.dp_size
        self.progress = progress and self.par.is_main
        self.metrics = self.run_dir / METRICS_FILE
        self.ckpt_root = self.run_dir / CKPT_DIR
        bf16 = tc.bf16 if tc.bf16 is not None else self.device.type == "cuda"
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None
        self.autocast = autocast or contextlib.nullcontext()

    def _check_longmem(self, cfg: RunConfig) -> None:
        """ValueError unless a LongMem run can train as configured."""
        lm, tc = cfg.model.longmem, cfg.train
        if not lm.backbone:
            raise ValueError(
                "a LongMem model trains on a frozen backbone: set model.longmem.backbone to a "
                "trained run directory"
            )
        if not isinstance(self.par, SingleProcess):
            raise ValueError("LongMem training runs in one process (its banks are per row)")
        if tc.context % lm.segment:
            raise ValueError(
                f"train.context ({tc.context}) must be a multiple of model.longmem.segment "
                f"({lm.segment}): a step holds whole segments (the next step's rows continue "
                "them through the bank)"
            )

    # ------------------------------------------------------------------ parts

    def resume(self, checkpoint: Path | None = None) -> None:
        """Continue from a checkpoint (default: the newest): weights, optimiser, random
        state, step and token count; metrics logged after it are dropped."""
        path = checkpoint or latest_checkpoint(self.ckpt_root)
        loaded, state = load_checkpoint(path, ["model", "optimizer", "rng"])
        try:
            self.model.load_state_dict(loaded["model"])
            load_optimizer(self.opt, loaded["optimizer"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run: {exc}") from None
        torch.set_rng_state(loaded["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in loaded["rng"]:  # else: another device
            torch.cuda.set_rng_state(loaded["rng"]["cuda"], self.device)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self._seconds_before = float(state.get("seconds", 0.0))  # older checkpoints: 0
        if self.par.is_main:
            _truncate_metrics(self.metrics, self.step)
            print(f"resumed from {path} at step {self.step} ({self.tokens:,} tokens)")

    def train_step(self) -> StepStats:
        """One optimisation step: ``grad_accum`` micro-batches, gradients reduced over
        processes, clipping, AdamW."""
        tc = self.cfg.train
        lr = lr_at(self.step, tc, self.seconds)
        for group in self.opt.param_groups:
            group["lr"] = lr
        negatives = tc.crossbatch.at(self.step)  # memory models: crossbatch (None: off)
        loss, aux = 0.0, None
        for micro in range(tc.grad_accum):
            x, y, *extra = self.source.batch(
                self.par.batch_index(self.step, micro, tc.grad_accum)
            )  # extra: a RETRO batch's neighbours
            x, y = to_device(x, self.device), to_device(y, self.device)
            nb = to_device(extra[0], self.device) if extra else None
            x, y, positions, normalizer = self.par.shard(x, y)  # this process's part
            state = None  # crossbatch: memory layers also read other rows' last windows
            if negatives is not None:
                state = self.model.new_state(len(x), crossbatch=negatives)
            if self.model.side is not None:  # LongMem: the rows' banks, kept across steps
                state = self.streams.get(micro)
                if state is None:
                    state = self.streams[micro] = self.model.new_state(len(x))
            with self.autocast:  # every term of the objective, in one function
                terms = self.model.loss_terms(
                    x, y, state=state, positions=positions, normalizer=normalizer, neighbours=nb
                )
            (terms.total / tc.grad_accum).backward()
            loss += float(terms.lm.detach()) / tc.grad_accum
            if terms.router_aux is not None:
                aux = (aux or 0.0) + float(terms.router_aux.detach()) / tc.grad_accum
        self.par.reduce_gradients(self.model)
        (loss,) = self.par.mean([loss])
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {self.step}; lower train.lr or enable grad_clip"
            )
        grad_norm = None
        if tc.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        return StepStats(loss, aux, lr, grad_norm, negatives)

    @property
    def seconds(self) -> float:
        """Training time of the run so far (earlier processes included): what
        ``max_minutes`` and the ``time`` schedule count."""
        return self._seconds_before + time.monotonic() - self._clock

    def evaluate(self) -> float:
        """Validation loss in the source's unit (bits per byte, or per target token)."""
        return validation_bits(self.model, self.source.val_batches, self.par)

    def save(self) -> Path:
        """Write a checkpoint of this step (the main process; the others wait for it)."""
        path = self.ckpt_root / checkpoint_name(self.step)
        if self.par.is_main:
            opt_tensors, opt_meta = optimizer_tensors(self.opt)
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            tensors = {"model": self.model.state_dict(), "optimizer": opt_tensors, "rng": rng}
            meta = {
                "tokens": self.tokens,
                "seconds": self.seconds,
                "config": self.cfg.to_dict(),
                "optimizer": opt_meta,
            }
            path = save_checkpoint(self.ckpt_root, self.step, tensors, meta)
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)
        self.par.barrier()
        return path

    # ------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        """Train until ``max_steps``, ``max_tokens``, ``max_minutes`` or Ctrl-C; then save
        and (unless interrupted) evaluate."""
        tc = self.cfg.train
        self.model.train()
        self._clock = self._window = time.monotonic()
        self._window_tokens = 0
        stopped_by, last, val, ckpt = "max_steps", None, None, None
        total = None if tc.schedule == "time" else tc.max_steps  # time: steps unknown
        bar = Progress(total, "train", unit="step", initial=self.step, enabled=self.progress)
        with _StopFlag() as stop, bar:
            reason = self._stop_reason(stop)  # a resumed run may have no budget left
            if reason:
                stopped_by = reason
            while self.step < tc.max_steps and not reason:
                stats = self.train_step()
                last = stats.loss
                self._window_tokens += self.tokens_per_step
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._log(stats, bar)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                    val = self._evaluate_and_log(bar)
                reason = self._stop_reason(stop)
                if reason:  # saved below, with the training time that stopped it
                    stopped_by = reason
                    break
                if self.step % tc.save_every == 0:
                    ckpt = self.save()
        if ckpt is None or ckpt.name != checkpoint_name(self.step):
            ckpt = self.save()
        if stopped_by != "interrupt":
            val = self._evaluate_and_log(None)
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            tokens=self.tokens,
            final_train_bpb=None if last is None else nats_to_bits(last),
            val_bpb=val,
            unigram_bpb=self.source.baseline,
            stopped_by=stopped_by,
            checkpoint=ckpt,
            seconds=self.seconds,
            unit=self.source.unit,
            baseline=self.source.baseline_name,
            model=self.model,
            corpus=getattr(self.source, "corpus", None),
        )

    def _log(self, stats: StepStats, bar: Progress) -> None:
        now = time.monotonic()
        tok_s = self._window_tokens / max(now - self._window, 1e-9)
        self._window, self._window_tokens = now, 0
        row = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": stats.loss,
            "bpb": nats_to_bits(stats.loss),
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_s": tok_s,
            "elapsed_s": self.seconds,  # the run's training time (across resumes)
            "peak_mem_gib": peak_memory(self.device) / 2**30,  # this process (rank)
        }
        if stats.negatives is not None:
            row["crossbatch_negatives"] = stats.negatives
        routed = self.model.routed_fractions()
        if routed:  # CoLT5: the fraction each router sent to its heavy branch
            row["router_aux_loss"] = stats.router_aux
            row["routed_fraction"] = routed
        if self.par.is_main:
            append_jsonl(self.metrics, row)
        post = {"loss": f"{stats.loss:.3f}", "bpb": f"{nats_to_bits(stats.loss):.3f}"}
        if routed:
            post["routed"] = f"{sum(routed.values()) / len(routed):.3f}"
        bar.set_postfix(**post, tok_s=f"{tok_s:,.0f}")

    def _evaluate_and_log(self, bar: Progress | None) -> float:
        """Evaluate; log it (``bar`` None: the final evaluation)."""
        val = self.evaluate()
        if self.par.is_main:
            row = {"step": self.step, "tokens": self.tokens, "val_bpb": val}
            append_jsonl(self.metrics, row if bar is not None else {**row, "final": True})
            if bar is not None:
                src = self.source
                bar.write(
                    f"step {self.step}: validation {val:.3f} {src.unit} "
                    f"({src.baseline_name} {src.baseline:.3f})"
                )
        return val

    def _stop_reason(self, stop: _StopFlag) -> str | None:
        """Why to stop after this step (every process takes the same decision)."""
        tc = self.cfg.train
        late = bool(tc.max_minutes) and self.seconds >= 60 * tc.max_minutes
        interrupted, late = self.par.any(stop.requested), self.par.any(late)
        if interrupted:
            return "interrupt"
        if tc.max_tokens and self.tokens >= tc.max_tokens:
            return "max_tokens"
        return "max_minutes" if late else None


def train(
    cfg: RunConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    checkpoint: Path | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
    parallel: Parallel | None = None,
    device=None,
) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns where it stopped and the numbers.

    ``parallel``: e.g. a :class:`longctx.distributed.training.ParallelTraining` (under
    torchrun: sequence shards per rank, gradients reduced over ranks; only rank 0
    writes); default one process. ``device``: auto (default), cpu, cuda or cuda:N."""
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        trainer = Trainer(
            cfg, run_dir, parallel=parallel, corpus=corpus, progress=progress, device=device
        )
        if resume:
            trainer.resume(checkpoint)
        return trainer.run()
    finally:
        torch.set_num_threads(threads)


def prepare_run(
    run_dir: Path, cfg: RunConfig | None, resume: bool, overrides: list[str] = ()
) -> RunConfig:
    """Fresh run: write config.json (refusing to overwrite another run). Resume: read it,
    apply any --set overrides (e.g. a larger train.max_steps)."""
    cfg_path = run_dir / CONFIG_FILE
    if resume:
        if not cfg_path.exists():
            raise ValueError(f"--resume: {run_dir} has no {CONFIG_FILE}; is it a run directory?")
        cfg = load_run_config(run_dir, overrides)
    else:
        if cfg_path.exists():
            raise ValueError(
                f"{run_dir} already holds a run; use --resume to continue it or choose "
                "another --out"
            )
        if cfg is None:
            raise ValueError("a new run needs a config")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_path, cfg.to_dict())
    return cfg


def load_run_config(run_dir: Path, overrides: list[str] = ()) -> RunConfig:
    """A run directory's config (any format version this longctx reads), with optional
    ``--set`` overrides applied."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{run_dir} has no {CONFIG_FILE}; is it a run directory?") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return RunConfig.from_dict(apply_overrides(data, list(overrides)))


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


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``; to CUDA through pinned memory, without waiting for the
    copy (the kernels that use it are queued after it)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint (they will be produced again)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write(path, "".join(line + "\n" for line in keep))


__all__ = [
    "StepStats",
    "TrainResult",
    "Trainer",
    "load_run_config",
    "prepare_run",
    "train",
    "validation_bits",
]

"""One rank's training job once its process group is set: the model, the optimizer and its
schedule, the steps, the checkpoints and the report, as one object the loop drives
(dlion.train.loop.train)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dlion.ledger import Ledger
from dlion.server import ServerLink
from dlion.train import dist as tdist
from dlion.train.checkpoint import CheckpointStore, TrainParts, load_parts, save_parts
from dlion.train.config import TrainConfig
from dlion.train.faults import Faults
from dlion.train.progress import Progress
from dlion.train.report import (
    RunRecord,
    build_report,
    gather_ledger_summaries,
    gather_mean_losses,
    gather_step_times,
    write_report,
)
from dlion.train.resources import ResourceLog
from dlion.train.tasks import Task, build_task, evaluate
from dlion.worker.catalogue import entry
from dlion.worker.core.base import CommOptimizer
from dlion.worker.core.byzantine import Byzantine
from dlion.worker.local.optimizer import LocalSteps

# Collective records the job keeps per rank: enough to look at, bounded for long runs.
LEDGER_RECORDS = 100


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Any:
    """lr multiplier at scheduler step s: linear up over ``warmup``, then cosine to ``min_ratio``."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class Job:
    cfg: TrainConfig
    ctx: tdist.DistContext
    task: Task
    opt: Any
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sched: LambdaLR
    rec: RunRecord
    parts: TrainParts
    store: CheckpointStore | None = None
    faults: Faults | None = None  # the tests' seam (dlion.train.faults)
    resources: ResourceLog = field(default_factory=ResourceLog)

    @staticmethod
    def build(
        cfg: TrainConfig, ctx: tdist.DistContext, *, process_group: Any, server: ServerLink | None
    ) -> Job:
        task = build_task(cfg, rank=ctx.rank, device=ctx.device, world_size=ctx.world_size)
        model = task.model
        args = cfg.build_args(
            process_group=process_group,
            server=server,
            byzantine=Byzantine(workers=cfg.byzantine, attack=cfg.attack) if cfg.byzantine else None,
            timeout=timedelta(seconds=cfg.timeout_s),
        )
        opt: Any = entry(cfg.optimizer).make(list(model.named_parameters()), args)
        opt.ledger.keep_records = LEDGER_RECORDS  # totals cover every step; records, the last few
        if isinstance(opt, (CommOptimizer, LocalSteps)):
            opt.sync_buffers(model)  # buffers start as rank 0's, with the parameters
        loss_of = opt.wrap(model) if entry(cfg.optimizer).ddp else model.loss
        assert cfg.warmup_steps is not None  # resolved when the config was built
        sched = LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        rec = RunRecord(
            config=cfg.as_dict(),
            corpus=task.data,
            n_params=model.num_params(),
            world_size=ctx.world_size,
            backend=ctx.backend,
        )
        parts = TrainParts(model, opt, sched, task.sampler, rec)
        return Job(cfg, ctx, task, opt, loss_of, sched, rec, parts)

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    def resume(self) -> None:
        """From the store's latest checkpoint, if there is one."""
        if self.store is not None:
            with self.store.latest() as folder:
                if folder is not None:
                    at = load_parts(folder, self.parts, rank=self.ctx.rank, world_size=self.ctx.world_size)
                    self.rec.resumed_from_step = at

    def score(self, step: int) -> float:
        """Rank 0's validation loss; with local steps, of the model the ranks last agreed on."""
        t0 = time.perf_counter()
        with self.opt.consensus() if isinstance(self.opt, LocalSteps) else contextlib.nullcontext():
            val, accuracy = evaluate(self.task, self.ctx.device)
        self.rec.eval_time_s += time.perf_counter() - t0
        self.rec.val_loss.append((step, val))
        if accuracy is not None:
            self.rec.val_accuracy.append((step, accuracy))
        return val

    def checkpoint(self, step: int, report: dict[str, Any] | None = None) -> None:
        assert self.store is not None
        ctx = self.ctx

        def write(folder: Path) -> None:
            save_parts(folder, self.parts, step=step, rank=ctx.rank, world_size=ctx.world_size)
            if self.faults is not None:
                self.faults.checkpoint_written(step)
            if report is not None:
                write_report(report, folder)

        self.store.save(step, write, _metrics(step, self.rec, self.opt.ledger))

    def run_steps(self) -> None:
        cfg, ctx, rec, opt = self.cfg, self.ctx, self.rec, self.opt
        progress = Progress(cfg.steps, enabled=self.is_main)
        for step in range(rec.resumed_from_step + 1, cfg.steps + 1):
            if self.faults is not None:
                self.faults.at_step(step - 1)
            t0 = time.perf_counter()
            x, y = self.task.sampler.next()
            loss = self.loss_of(x.to(ctx.device), y.to(ctx.device))
            loss.backward()
            opt.step()
            if step == cfg.steps and isinstance(opt, LocalSteps):
                opt.sync()  # a partial last round ends here: every rank holds the same model
            opt.zero_grad(set_to_none=True)
            self.sched.step()
            rec.train_loss.append(loss.item())
            rec.step_time_s.append(time.perf_counter() - t0)
            sampled = step % cfg.eval_every == 0 or step == cfg.steps
            val = self.score(step) if self.is_main and sampled else None
            if sampled:
                self.resources.add(step)
            progress.update(step, rec.train_loss[-1], opt.ledger, val)
            every = cfg.checkpoint_every
            if self.store is not None and every and step % every == 0 and step < cfg.steps:
                self.checkpoint(step)
        progress.close()

    def finish(self, started: float) -> dict[str, Any] | None:
        """The loop's own collectives, after the last step: rank 0's report (None elsewhere),
        also written into the last checkpoint."""
        ctx, rec, opt = self.ctx, self.rec, self.opt
        close = getattr(opt, "close", None)
        server_ledger = close() if close is not None else None
        mean_loss, rank_loss = gather_mean_losses(ctx, rec.train_loss)
        step_times = gather_step_times(ctx, rec.step_time_s)
        ledgers = gather_ledger_summaries(ctx, opt.ledger.summary())
        identical, sums, digest = tdist.params_identical(ctx, self.task.model.parameters())
        by_rank = self.resources.gather(ctx)
        rec.wall_time_s = time.perf_counter() - started
        rec.rounds = opt.rounds if isinstance(opt, LocalSteps) else None
        report = None
        if self.is_main:
            report = build_report(
                rec,
                mean_train_loss=mean_loss,
                rank_mean_loss=rank_loss,
                step_bytes=opt.ledger.step_bytes(),
                ledgers=ledgers,
                identical=identical,
                param_sums=sums,
                param_sha256=digest,
                server_ledger=server_ledger,
                resources=by_rank,
                step_time_by_rank=step_times,
            )
        if self.store is not None:
            self.checkpoint(self.cfg.steps, report)
        return report


def _metrics(step: int, rec: RunRecord, ledger: Ledger) -> dict[str, float]:
    """What a checkpoint carries for the launcher to show: this rank's latest figures."""
    s = ledger.summary()
    keys = ("bytes_sent", "bytes_received", "bits_per_param_up", "bits_per_param_down")
    return {
        "step": step,
        "train_loss": rec.train_loss[-1] if rec.train_loss else math.nan,
        "val_loss": rec.val_loss[-1][1] if rec.val_loss else math.nan,
        **{k: s[k] for k in keys},
    }

"""The training loop: one process of the job, from its config to rank 0's report.

Every rank builds the same model from the seed, draws its own batches, and steps the
optimizer; the optimizer alone keeps parameters in step across ranks. Rank 0 scores
the fixed validation batches itself, since its parameters are everyone's. The loop's
own collectives all come after the last step: losses, ledgers and a parameter checksum.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dlion.compress.warm import warm_up
from dlion.ledger import Ledger
from dlion.server import ParameterServer, ServerLink, split_server
from dlion.train import dist as tdist
from dlion.train.args import parse_config
from dlion.train.checkpoint import CheckpointStore, DirStore, TrainParts, load_parts, save_parts
from dlion.train.config import TrainConfig
from dlion.train.faults import inject_checkpoint_fault, inject_fault
from dlion.train.output import check_out, out_dir, publish
from dlion.train.progress import Progress
from dlion.train.report import (
    RunRecord,
    build_report,
    gather_ledger_summaries,
    gather_mean_losses,
    write_report,
)
from dlion.train.resources import ResourceLog
from dlion.train.tasks import build_task, evaluate
from dlion.train.virtual import check_alone, run_virtual
from dlion.transport import make_comm
from dlion.worker.catalogue import entry
from dlion.worker.core.base import CommOptimizer
from dlion.worker.core.byzantine import Byzantine

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


def train(
    cfg: TrainConfig, ctx: tdist.DistContext, started: float, store: CheckpointStore | None = None
) -> dict[str, Any] | None:
    """Run the job on this rank; rank 0 gets the report, the others None.

    With a checkpoint store (or ``cfg.checkpoint_dir``) the job resumes from the latest
    checkpoint, saves one every ``cfg.checkpoint_every`` steps, and a last one, holding
    the report, at the end.
    """
    link, group = None, None
    if cfg.server == "dedicated":
        roles = split_server(transport=cfg.transport, timeout=timedelta(seconds=cfg.timeout_s))
        if roles.is_server:
            _serve(roles.link)
            return None
        # From here on the job is the workers: the server takes no part in the report.
        workers = make_comm(roles.workers, timedelta(seconds=cfg.timeout_s), cfg.transport)
        assert workers is not None  # a job with a dedicated server has a process group
        ctx = replace(ctx, world_size=workers.world_size, comm=workers)
        link, group = roles.link, roles.workers
    _ready_kernels(announce=ctx.rank == 0)
    task = build_task(cfg, rank=ctx.rank, device=ctx.device)
    model, sampler = task.model, task.sampler
    args = cfg.build_args(
        process_group=group if group is not None else ctx.comm,
        server=link,
        byzantine=Byzantine(workers=cfg.byzantine, attack=cfg.attack) if cfg.byzantine else None,
        timeout=timedelta(seconds=cfg.timeout_s),
    )
    opt: Any = entry(cfg.optimizer).make(list(model.named_parameters()), args)
    opt.ledger.keep_records = LEDGER_RECORDS  # totals cover every step; records, the last few
    if isinstance(opt, CommOptimizer):
        opt.sync_buffers(model)  # buffers start as rank 0's, with the parameters
    loss_of = opt.wrap(model) if entry(cfg.optimizer).ddp else model.loss
    assert cfg.warmup_steps is not None  # resolved when the config was built
    sched = LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    is_main = ctx.rank == 0
    rec = RunRecord(
        config=cfg.as_dict(),
        corpus=task.data,
        n_params=model.num_params(),
        world_size=ctx.world_size,
        backend=ctx.backend,
    )
    parts = TrainParts(model, opt, sched, sampler, rec)
    if store is None and cfg.checkpoint_dir is not None:
        store = DirStore(Path(cfg.checkpoint_dir), rank=ctx.rank, barrier=lambda: _barrier(ctx))
    if store is not None:
        with store.latest() as folder:
            if folder is not None:
                rec.resumed_from_step = load_parts(folder, parts, rank=ctx.rank, world_size=ctx.world_size)

    def score(step: int) -> float:
        t0 = time.perf_counter()
        val, accuracy = evaluate(task, ctx.device)
        rec.eval_time_s += time.perf_counter() - t0
        rec.val_loss.append((step, val))
        if accuracy is not None:
            rec.val_accuracy.append((step, accuracy))
        return val

    def checkpoint(step: int, report: dict[str, Any] | None = None) -> None:
        assert store is not None

        def write(folder: Path) -> None:
            save_parts(folder, parts, step=step, rank=ctx.rank, world_size=ctx.world_size)
            inject_checkpoint_fault(ctx.rank, step)
            if report is not None:
                write_report(report, folder)

        store.save(step, write, _metrics(step, rec, opt.ledger))

    if is_main and rec.resumed_from_step == 0:
        score(0)
    rec.setup_time_s = time.perf_counter() - started
    progress = Progress(cfg.steps, enabled=is_main)
    resources = ResourceLog()
    for step in range(rec.resumed_from_step + 1, cfg.steps + 1):
        inject_fault(ctx.rank, step - 1)
        t0 = time.perf_counter()
        x, y = sampler.next()
        loss = loss_of(x.to(ctx.device), y.to(ctx.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        rec.train_loss.append(loss.item())
        rec.step_time_s.append(time.perf_counter() - t0)
        sampled = step % cfg.eval_every == 0 or step == cfg.steps
        val = score(step) if is_main and sampled else None
        if sampled:
            resources.add(step)
        progress.update(step, rec.train_loss[-1], opt.ledger, val)
        if (
            store is not None
            and cfg.checkpoint_every
            and step % cfg.checkpoint_every == 0
            and step < cfg.steps
        ):
            checkpoint(step)
    progress.close()
    close = getattr(opt, "close", None)
    server_ledger = close() if close is not None else None

    mean_loss, rank_loss = gather_mean_losses(ctx, rec.train_loss)
    ledgers = gather_ledger_summaries(ctx, opt.ledger.summary())
    identical, sums, digest = tdist.params_identical(ctx, model.parameters())
    by_rank = resources.gather(ctx)
    rec.wall_time_s = time.perf_counter() - started
    report = (
        build_report(
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
        )
        if is_main
        else None
    )
    if store is not None:
        checkpoint(cfg.steps, report)
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


def _barrier(ctx: tdist.DistContext) -> None:
    tdist.all_gather_rows(ctx, torch.zeros(1))


def _serve(link: ServerLink) -> None:
    server = ParameterServer(link)
    steps = server.serve()
    s = server.ledger.summary()
    print(
        f"parameter server: served {steps} steps | sent {s['bytes_sent'] / 1e6:.2f} MB, "
        f"received {s['bytes_received'] / 1e6:.2f} MB",
        flush=True,
    )


def _ready_kernels(*, announce: bool) -> None:
    """Compile (or load) the kernels before the first step, saying so when it takes a while."""
    note = threading.Timer(3.0, print, ["dlion: compiling the kernels (first run here; Numba caches them)"])
    if announce:
        note.start()
    took = warm_up()
    note.cancel()
    if announce and took > 3.0:
        print(f"dlion: kernels ready in {took:.1f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            tdist.record_failure(e)
        raise
    except BaseException as e:
        tdist.record_failure(e)
        raise


def _main(argv: Sequence[str] | None) -> int:
    started = time.perf_counter()
    cfg = parse_config(argv)
    if cfg.virtual_workers:
        try:
            check_alone()
            check_out(out_dir(cfg, cfg.virtual_workers), overwrite=cfg.overwrite)
        except ValueError as e:
            raise SystemExit(f"python -m dlion.train: error: {e}") from None
        publish(run_virtual(cfg, lambda ctx: train(cfg, ctx, started)), cfg)
        return 0
    local = entry(cfg.optimizer).single_process
    try:
        ctx = tdist.setup(needs_group=not local, timeout_s=cfg.timeout_s, transport=cfg.transport)
    except ValueError as e:
        if local:
            e = ValueError(
                f"optimizer {cfg.optimizer!r} {e}; use 'lion-global' or 'dlion-mavo' with several workers"
            )
        # A launch mistake, not a bug: a one-line message (exit status 1), no traceback.
        raise SystemExit(f"python -m dlion.train: error: {e}") from None
    try:
        if ctx.rank == 0:  # the report's folder, before any work
            workers = ctx.world_size - (1 if cfg.server == "dedicated" else 0)
            try:
                check_out(out_dir(cfg, workers), overwrite=cfg.overwrite)
            except ValueError as e:
                raise SystemExit(f"python -m dlion.train: error: {e}") from None
        tdist.set_thread_counts(ctx.local_world_size)
        report = train(cfg, ctx, started)
    finally:
        tdist.teardown(ctx)
    if report is not None:
        publish(report, cfg)
    return 0

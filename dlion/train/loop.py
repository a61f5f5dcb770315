"""The training loop: one process of the job, from its config to rank 0's report.

Every rank builds the same model from the seed, draws its own batches, and steps the
optimizer; the optimizer alone keeps parameters in step across ranks. Rank 0 scores
the fixed validation batches itself, since its parameters are everyone's. The loop's
own collectives all come after the last step: losses, ledgers and a parameter checksum.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from dlion.ledger import Ledger
from dlion.server import ParameterServer, ServerLink, split_server
from dlion.train import dist as tdist
from dlion.train.args import parse_config
from dlion.train.checkpoint import CheckpointStore, DirStore, TrainParts, load_parts, save_parts
from dlion.train.config import TrainConfig
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
from dlion.transport import make_comm
from dlion.worker.byzantine import Byzantine
from dlion.worker.catalogue import entry

# Test hook: the rank named here raises at the step named (default 0), so tests can
# check that the launcher stops the job and names the rank.
FAULT_RANK_ENV = "DLION_FAULT_RANK"
FAULT_STEP_ENV = "DLION_FAULT_STEP"
# With this set to a path, the fault fires once: a restarted job (Ray, torchrun) goes on.
FAULT_ONCE_ENV = "DLION_FAULT_ONCE_FILE"
# "raise" (default): an exception the rank reports; "kill": SIGKILL, the rank says nothing;
# "checkpoint-kill": SIGKILL while the checkpoint of that step is being written.
FAULT_KIND_ENV = "DLION_FAULT_KIND"
CHECKPOINT_KILL = "checkpoint-kill"

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


def _fault_due(rank: int, step: int) -> bool:
    if os.environ.get(FAULT_RANK_ENV) != str(rank) or os.environ.get(FAULT_STEP_ENV, "0") != str(step):
        return False
    once = os.environ.get(FAULT_ONCE_ENV)
    if once is not None:
        try:  # the first process to create the file faults; a restarted one goes on
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    return True


def _inject_fault(rank: int, step: int) -> None:
    """At the start of a step: raise, or SIGKILL this rank."""
    kind = os.environ.get(FAULT_KIND_ENV, "raise")
    if kind == CHECKPOINT_KILL or not _fault_due(rank, step):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_RANK_ENV})")


def _inject_checkpoint_fault(rank: int, step: int) -> None:
    """SIGKILL this rank after it wrote its checkpoint files, before the others agree on them."""
    if os.environ.get(FAULT_KIND_ENV) == CHECKPOINT_KILL and _fault_due(rank, step):
        os.kill(os.getpid(), signal.SIGKILL)


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
    task = build_task(cfg, rank=ctx.rank, device=ctx.device)
    model, sampler = task.model, task.sampler
    args = cfg.build_args(
        process_group=group,
        server=link,
        byzantine=Byzantine(workers=cfg.byzantine, attack=cfg.attack) if cfg.byzantine else None,
        timeout=timedelta(seconds=cfg.timeout_s),
    )
    opt: Any = entry(cfg.optimizer).make(list(model.named_parameters()), args)
    opt.ledger.keep_records = LEDGER_RECORDS  # totals cover every step; records, the last few
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
            _inject_checkpoint_fault(ctx.rank, step)
            if report is not None:
                write_report(report, folder)

        store.save(step, write, _metrics(step, rec, opt.ledger))

    if is_main and rec.resumed_from_step == 0:
        score(0)
    rec.setup_time_s = time.perf_counter() - started
    progress = Progress(cfg.steps, enabled=is_main)
    resources = ResourceLog()
    for step in range(rec.resumed_from_step + 1, cfg.steps + 1):
        _inject_fault(ctx.rank, step - 1)
        t0 = time.perf_counter()
        x, y = sampler.next()
        loss = model.loss(x.to(ctx.device), y.to(ctx.device))
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
        tdist.set_thread_counts(ctx.local_world_size)
        report = train(cfg, ctx, started)
    finally:
        tdist.teardown(ctx)
    if report is not None:
        publish(report, cfg)
    return 0


def publish(report: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write the report to ``cfg.out`` (default ``runs/<optimizer>-w<workers>``) and say so."""
    workers = report["config"]["world_size"]  # a dedicated server is not a worker
    out = Path(cfg.out) if cfg.out is not None else Path("runs") / f"{cfg.optimizer}-w{workers}"
    path = write_report(report, out)
    ledger = report["ledger"]
    print(
        f"final val loss {report['final_val_loss']:.4f} | {report['wall_time_s']:.1f} s "
        f"({report['step_time_s_mean']:.3f} s/step) | {ledger['bits_per_param_up']:.3f} bits/param up, "
        f"{ledger['bits_per_param_down']:.3f} down | params identical across ranks: "
        f"{report['params_identical_across_ranks']} | report: {path}",
        flush=True,
    )
    return path

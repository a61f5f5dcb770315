"""The training loop: one process of the job, from its config to rank 0's report.

Every rank builds the same model from the seed, draws its own batches, and steps the
optimizer; the optimizer alone keeps parameters in step across ranks. Rank 0 scores
the fixed validation batches itself, since its parameters are everyone's. The loop's
own collectives all come after the last step: losses, ledgers and a parameter checksum.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from dlion.server.comm import world_comm
from dlion.server.ledger import Ledger
from dlion.server.ps import ParameterServer, ServerLink, split_server
from dlion.train import dist as tdist
from dlion.train.config import TrainConfig, parse_config
from dlion.train.data import BatchSampler, CorpusConfig, eval_batches, load_corpus
from dlion.train.model import ByteGPT, ModelConfig
from dlion.train.report import (
    RunRecord,
    build_report,
    gather_ledger_summaries,
    gather_mean_losses,
    write_report,
)
from dlion.worker.registry import build_optimizer

# Test hook: the rank named here raises at the step named (default 0), so tests can
# check that the launcher stops the job and names the rank.
FAULT_RANK_ENV = "DLION_FAULT_RANK"
FAULT_STEP_ENV = "DLION_FAULT_STEP"

# Optimizers that run without a process group, and refuse a world size > 1.
LOCAL_OPTIMIZERS = frozenset({"lion"})


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Any:
    """lr multiplier at scheduler step s: linear up over ``warmup``, then cosine to ``min_ratio``."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _torch_optimizer(opt: Any) -> torch.optim.Optimizer:
    # Wrapping optimizers (global all-reduce, local Lion) keep their torch optimizer in
    # .inner; an LR scheduler has to drive that one's param groups.
    for candidate in (opt, getattr(opt, "inner", None)):
        if isinstance(candidate, torch.optim.Optimizer):
            return candidate
    raise TypeError(f"{type(opt).__name__} is not a torch.optim.Optimizer and wraps none in .inner")


@torch.no_grad()
def evaluate(model: ByteGPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    model.eval()
    total = sum(float(model.loss(x.to(device), y.to(device))) for x, y in batches)
    model.train()
    return total / len(batches)


def _inject_fault(rank: int, step: int) -> None:
    if os.environ.get(FAULT_RANK_ENV) == str(rank) and os.environ.get(FAULT_STEP_ENV, "0") == str(step):
        raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_RANK_ENV})")


class Progress:
    """tqdm on a terminal; a plain line every tenth of the run when the output is a file."""

    def __init__(self, steps: int, enabled: bool) -> None:
        self.steps = steps
        self.enabled = enabled
        self.bar = (
            tqdm(total=steps, unit="step", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None
        )
        self.every = max(1, steps // 10)
        # Ledger totals are summed over every step so far: refresh them only now and then.
        self.bar_every = max(1, steps // 200)

    def update(self, step: int, loss: float, ledger: Ledger, val: float | None) -> None:
        if not self.enabled:
            return
        last = step == self.steps
        if self.bar is not None:
            if step % self.bar_every == 0 or last:
                sent = ledger.summary()["bytes_sent"] / 1e6
                self.bar.set_postfix(loss=f"{loss:.3f}", sent=f"{sent:.2f}MB", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or last:
            sent = ledger.summary()["bytes_sent"] / 1e6
            val_text = f" val {val:.4f}" if val is not None else ""
            print(f"step {step}/{self.steps} loss {loss:.4f}{val_text} sent {sent:.2f} MB", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, ctx: tdist.DistContext, started: float) -> dict[str, Any] | None:
    """Run the job on this rank; rank 0 gets the report, the others None."""
    link, group = None, None
    if cfg.server == "dedicated":
        roles = split_server(transport=cfg.transport, timeout=timedelta(seconds=cfg.timeout_s))
        if roles.is_server:
            _serve(roles.link)
            return None
        # From here on the job is the workers: the server takes no part in the report.
        workers = world_comm(roles.workers, timedelta(seconds=cfg.timeout_s), cfg.transport)
        ctx = replace(ctx, world_size=workers.world_size, comm=workers)
        link, group = roles.link, roles.workers
    model_cfg = ModelConfig(context=cfg.context, d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)
    corpus = load_corpus(CorpusConfig(max_bytes=cfg.data_bytes), min_bytes=cfg.context + 1)
    model = ByteGPT(model_cfg, seed=cfg.seed).to(ctx.device)
    opt = build_optimizer(
        cfg.optimizer,
        list(model.named_parameters()),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2),
        seed=cfg.seed,
        backend=cfg.backend,
        transport=cfg.transport,
        process_group=group,
        server=link,
        cautious_wd=cfg.cautious_wd,
    )
    sched = LambdaLR(_torch_optimizer(opt), warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
    sampler = BatchSampler(
        corpus.train, batch_size=cfg.batch_size, context=cfg.context, seed=cfg.seed, rank=ctx.rank
    )
    is_main = ctx.rank == 0
    val_batches = (
        eval_batches(corpus.val, batch_size=cfg.batch_size, context=cfg.context, n_batches=cfg.eval_batches)
        if is_main
        else []
    )
    rec = RunRecord(
        config=cfg.as_dict(),
        corpus=corpus.describe(),
        n_params=model.num_params(),
        world_size=ctx.world_size,
        backend=ctx.backend,
    )

    def score(step: int) -> float:
        t0 = time.perf_counter()
        val = evaluate(model, val_batches, ctx.device)
        rec.eval_time_s += time.perf_counter() - t0
        rec.val_loss.append((step, val))
        return val

    if is_main:
        score(0)
    rec.setup_time_s = time.perf_counter() - started
    progress = Progress(cfg.steps, enabled=is_main)
    for step in range(1, cfg.steps + 1):
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
        val = score(step) if is_main and (step % cfg.eval_every == 0 or step == cfg.steps) else None
        progress.update(step, rec.train_loss[-1], opt.ledger, val)
    progress.close()
    close = getattr(opt, "close", None)
    server_ledger = close() if close is not None else None

    mean_loss, rank_loss = gather_mean_losses(ctx, rec.train_loss)
    ledgers = gather_ledger_summaries(ctx, opt.ledger.summary())
    identical, sums = tdist.params_identical(ctx, model.parameters())
    rec.wall_time_s = time.perf_counter() - started
    if not is_main:
        return None
    return build_report(
        rec,
        mean_train_loss=mean_loss,
        rank_mean_loss=rank_loss,
        step_bytes=opt.ledger.step_bytes(),
        ledgers=ledgers,
        identical=identical,
        param_sums=sums,
        server_ledger=server_ledger,
    )


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
    local = cfg.optimizer in LOCAL_OPTIMIZERS
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
    return 0

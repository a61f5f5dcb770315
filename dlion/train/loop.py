"""The training loop: one process of the job, from its config to rank 0's report.

Every rank builds the same model from the seed, draws its own batches, and steps the
optimizer; the optimizer alone keeps parameters in step across ranks. Rank 0 scores
the fixed validation batches itself, since its parameters are everyone's. The loop's
own collectives all come after the last step: losses, ledgers and a parameter checksum.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from dlion.compress.warm import warm_up
from dlion.server import ParameterServer, ServerLink, split_server
from dlion.train import dist as tdist
from dlion.train.args import parse_config
from dlion.train.checkpoint import CheckpointStore, DirStore
from dlion.train.config import TrainConfig
from dlion.train.faults import planned_faults
from dlion.train.job import Job
from dlion.train.output import check_out, out_dir, publish
from dlion.train.virtual import check_alone, run_virtual
from dlion.transport import make_comm
from dlion.worker.catalogue import entry


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
    faults = planned_faults(ctx.rank)  # the tests' seam (dlion.train.faults); None outside tests
    _ready_kernels(announce=ctx.rank == 0)
    if store is None and cfg.checkpoint_dir is not None:
        store = DirStore(Path(cfg.checkpoint_dir), rank=ctx.rank, barrier=lambda: _barrier(ctx))
    job = Job.build(cfg, ctx, process_group=group if group is not None else ctx.comm, server=link)
    job.store, job.faults = store, faults
    job.resume()
    if job.is_main and job.rec.resumed_from_step == 0:
        job.score(0)
    job.rec.setup_time_s = time.perf_counter() - started
    job.run_steps()
    return job.finish(started)


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

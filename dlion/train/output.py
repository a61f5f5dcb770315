"""Where a run's report goes, checked before any work, and the line that sums the run up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlion.ledger import saving
from dlion.train.config import TrainConfig
from dlion.train.report import REPORT_FILE, write_report
from dlion.worker.catalogue import entry


def out_dir(cfg: TrainConfig, workers: int) -> Path:
    """``--out``, or a folder named for what tells runs apart:
    runs/<task>-<optimizer>[-<backend>][-mpi][-dedicated][-virtual][-h<local steps>]-w<workers>-s<seed>."""
    if cfg.out is not None:
        return Path(cfg.out)
    parts = [cfg.task, cfg.optimizer]
    if entry(cfg.optimizer).backends and cfg.backend is not None:
        parts.append(cfg.backend)
    if cfg.transport != "torch":
        parts.append(cfg.transport)
    if cfg.server == "dedicated":
        parts.append("dedicated")
    if cfg.virtual_workers:
        parts.append("virtual")
    if "local_steps" in entry(cfg.optimizer).option_names:
        parts.append(f"h{cfg.local_steps}")
    return Path("runs") / "-".join([*parts, f"w{workers}", f"s{cfg.seed}"])


def check_out(path: Path, *, overwrite: bool) -> None:
    """Before any work: ``path`` can be made and written, and holds no finished report unless
    ``overwrite``. Raises ValueError saying which and what to do."""
    if (path / REPORT_FILE).exists() and not overwrite:
        raise ValueError(
            f"{path} already holds a finished run's {REPORT_FILE}; pass --overwrite to replace it, "
            "or choose another --out"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dlion-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {path} cannot be written: {err.strerror or err}") from None


def bits_text(ledger: dict[str, Any], world_size: int) -> str:
    """ "1.500 bits/param up, 1.500 down; fp32 all-reduce: 48.0 each way, 32.0x fewer"."""
    up, down = ledger["bits_per_param_up"], ledger["bits_per_param_down"]
    text = f"{up:.3f} bits/param up, {down:.3f} down"
    node_up = ledger.get("node_bits_per_param_up", 0.0)
    if node_up:  # the hierarchical backend: what crossed the network, then inside nodes
        net_up, net_down = up - node_up, down - ledger["node_bits_per_param_down"]
        text = f"{net_up:.3f} bits/param up, {net_down:.3f} down between nodes ({node_up:.1f} inside nodes)"
    s = saving(ledger, world_size)
    if s["fewer_than_fp32"] is not None:
        ref, fewer = s["fp32_allreduce_bits_per_param"], s["fewer_than_fp32"]
        text += f"; fp32 all-reduce: {ref:.1f} each way, {fewer:.1f}x fewer"
    return text


def publish(report: dict[str, Any], cfg: TrainConfig) -> Path:
    """Write the report where ``out_dir`` says and print the run's summary line."""
    workers = report["config"]["world_size"]  # a dedicated server is not a worker
    path = write_report(report, out_dir(cfg, workers))
    print(
        f"final val loss {report['final_val_loss']:.4f} | {report['wall_time_s']:.1f} s "
        f"({report['step_time_s_mean']:.3f} s/step) | {bits_text(report['ledger'], workers)} | params "
        f"identical across ranks: {report['params_identical_across_ranks']} | report: {path}",
        flush=True,
    )
    return path

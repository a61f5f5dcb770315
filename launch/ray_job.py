"""The training job on a Ray cluster, through Ray Train's TorchTrainer.

    ray job submit --working-dir . -- python -m launch.ray_job --workers 4 [--gpus-per-worker 1] ...

The driver (this module, wherever ``ray job submit`` runs it) builds the TrainConfig,
so a bad flag fails before any worker starts, and hands every worker the same argv.
Ray makes the process group (NCCL on GPU workers, Gloo otherwise); each worker runs
the same loop as ``python -m dlion.train`` with a Ray checkpoint store:

1. Resume: a restarted worker group (FailureConfig) or a run started again under the
   same ``--name`` restores the latest checkpoint, each rank its own momentum.
2. Every ``--checkpoint-every`` steps each rank reports its own files (see
   dlion.train.checkpoint), which Ray merges into one checkpoint folder, with rank 0's
   metrics and ledger bytes attached: Ray Train keeps metrics only when a checkpoint
   comes with them.
3. At the end, the same JSON report as ``dlion train`` travels in the last checkpoint;
   the driver writes it to ``--out`` and prints the same summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from dlion.train.args import add_train_arguments, config_from_args, parse_config
from dlion.train.config import TrainConfig
from dlion.train.report import REPORT_FILE
from dlion.worker.catalogue import entry

# Ray Train's default of 60 s for the worker group to start is too short for a few workers
# importing torch on a small machine; a user's own setting wins.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = "300"
# Ray Train patches the workers' print to log each line through the root logger (stderr) as
# well as to stdout, so the driver would show every progress line twice. Ray Train passes
# this variable on from the driver to the workers.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
# The driver's settings with this prefix (fault injection, error files) reach every worker.
FORWARDED_PREFIX = "DLION_"
RAY_RESULT_FILE = "ray_result.json"


class RayStore:
    """Checkpoints as Ray Train checkpoints: every rank reports its own files."""

    @contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save(self, step: int, write: Any, metrics: dict[str, float]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="dlion-ckpt-") as folder:
            write(Path(folder))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:08d}")


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the job's loop in the process group Ray made."""
    import ray.train.torch

    from dlion.train import dist as tdist
    from dlion.train.loop import train

    started = time.perf_counter()
    os.environ.update(config["env"])
    cfg = parse_config(config["argv"], prog="launch.ray_job worker")
    ctx = tdist.joined(ray.train.torch.get_device(), cfg.timeout_s)
    tdist.set_thread_counts(ctx.local_world_size)
    train(cfg, ctx, started, RayStore())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.ray_job",
        description="Train the byte-level transformer on a Ray cluster with Ray Train's TorchTrainer; "
        "writes OUT/report.json like `dlion train`.",
    )
    a = parser.add_argument
    a("--workers", type=int, default=4, help="Ray Train workers, one rank each (default: %(default)s)")
    a("--gpus-per-worker", type=float, default=0.0, help="0: CPU workers on Gloo (default: %(default)s)")
    a("--cpus-per-worker", type=float, default=1.0, help="default: %(default)s")
    a(
        "--storage-path",
        default=None,
        help="where Ray keeps checkpoints and results: a folder every node can reach, or a cloud "
        "URI (default: Ray's, ~/ray_results)",
    )
    a("--name", default=None, help="run name; an existing run of this name resumes (default: a new name)")
    a(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts; -1: unlimited (default: %(default)s)",
    )
    a("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a new local cluster)")
    add_train_arguments(parser)
    return parser


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig, with every flag Ray cannot honour refused by name."""
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    for name in ("gpus_per_worker", "cpus_per_worker"):
        value = getattr(args, name)
        if not value >= 0 or (name == "cpus_per_worker" and value == 0):
            parser.error(
                f"--{name.replace('_', '-')} must be {'> 0' if 'cpus' in name else '>= 0'}, got {value}"
            )
    if args.max_failures < -1:
        parser.error(f"--max-failures must be >= -1, got {args.max_failures}")
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    refused = {
        "transport": (cfg.transport != "torch", "Ray makes a torch.distributed group; use --transport torch"),
        "server": (cfg.server != "rank0", "a dedicated server process does not report checkpoints to Ray"),
        "checkpoint-dir": (cfg.checkpoint_dir is not None, "Ray keeps the checkpoints (see --storage-path)"),
        "optimizer": (entry(cfg.optimizer).single_process, "single-process; use lion-global or dlion-mavo"),
    }
    for flag, (bad, why) in refused.items():
        if bad:
            parser.error(f"--{flag} {getattr(cfg, flag.replace('-', '_'))}: not under Ray: {why}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = _config(parser, args)
    try:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        parser.error(f"Ray Train is not installed ({e}); pip install -e '.[ray]'")

    from dlion.train.output import publish

    os.environ.setdefault(START_TIMEOUT_ENV, DEFAULT_START_TIMEOUT_S)
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    name = (
        args.name or f"dlion-{cfg.optimizer}-w{args.workers}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    ray.init(address=args.address, log_to_driver=True)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIX)}
    gpus = args.gpus_per_worker
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"argv": cfg.to_argv(), "env": env},
        torch_config=TorchConfig(timeout_s=max(1, int(cfg.timeout_s))),
        scaling_config=ScalingConfig(
            num_workers=args.workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": args.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=args.storage_path,
            failure_config=FailureConfig(max_failures=args.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError and friends: say what failed, no traceback
        print(f"launch.ray_job: run {name!r} failed: {e}", file=sys.stderr, flush=True)
        return 1
    if result.checkpoint is None:
        print(f"launch.ray_job: run {name!r} ended without a checkpoint", file=sys.stderr, flush=True)
        return 1
    with result.checkpoint.as_directory() as folder:
        report = _read_report(Path(folder))
    if cfg.out is None and Path(result.path).is_dir():
        # Under `ray job submit` the working directory is a copy Ray deletes: by default
        # the report goes beside the run's checkpoints instead.
        cfg = replace(cfg, out=result.path)
    path = publish(report, cfg)
    # Beside the report (which is the same as every launcher's): where Ray keeps the run.
    ray_result = {
        "name": name,
        "path": result.path,
        "checkpoint": result.checkpoint.path,
        "metrics": result.metrics,
    }
    (path.parent / RAY_RESULT_FILE).write_text(json.dumps(ray_result, indent=1) + "\n")
    print(f"ray: run {name!r} | last checkpoint {result.checkpoint.path}", flush=True)
    return 0


def _read_report(folder: Path) -> dict[str, Any]:
    path = folder / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the last checkpoint {folder} holds no {REPORT_FILE}")
    return dict(json.loads(path.read_text()))


if __name__ == "__main__":
    sys.exit(main())

"""Threads: does DistributedLion slow the torch work beside it, in a script a user launched?

    python -m bench.threads [--quick] [--ranks 4] [--width 1024] [--steps 20] [--rounds 2]
                            [--launchers spawn,torchrun] [--envs default,tuned[,numba1]]
                            [--out bench-results/threads]

Each launch starts ``--ranks`` Gloo ranks the way a user's script would be started, not by
dlion's launchers: ``torch.multiprocessing.spawn`` from a fresh interpreter, or ``torchrun
--standalone`` (which exports OMP_NUM_THREADS=1). Every rank holds one model (three Linear
layers, 6.3M parameters at --width 1024) and times, alternately, a DistributedLion step and
a torch.optim.AdamW step on a copy of it, then the CPU its process burns while it sleeps
20 ms after a DistributedLion step (threads left spinning). Each launcher runs in the
environment a user has ("default": OMP_*, NUMBA_*, MKL_* and GOMP_* removed) and with
NUMBA_NUM_THREADS=1 OMP_WAIT_POLICY=passive exported ("tuned"), which the default should
come within 10% of ("numba1", NUMBA_NUM_THREADS=1 alone, on request). Under torchrun each
rank also times whole iterations (forward, backward, step) of DDP + AdamW and of
DistributedLion on the same model and batch. Reported: the median over timed steps of the
slowest rank; each launch runs --rounds times, interleaved, and the best round is kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LAUNCHERS = ("spawn", "torchrun")
# What a user's shell might have set that changes threads; removed for the default run.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "OMP_DYNAMIC",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
)
# default: what a user's shell has; tuned: the hand-tuned setting the default should match;
# numba1: Numba's threads alone pinned, to tell dlion's share of a gap from torch's own.
ENVIRONMENTS = {
    "default": {},
    "tuned": {"NUMBA_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"},
    "numba1": {"NUMBA_NUM_THREADS": "1"},
}
TARGET = 0.10  # default within 10% of tuned
QUICK = {"width": 512, "steps": 4, "warmup": 2, "rounds": 1, "launchers": ("torchrun",)}
IDLE_S = 0.02


@dataclass(frozen=True, kw_only=True)
class ThreadsBenchConfig:
    ranks: int = 4
    width: int = 1024  # three Linear layers: width -> 2 width -> width -> 2 width
    batch: int = 8
    steps: int = 20
    warmup: int = 3
    rounds: int = 2  # each launch this many times, interleaved; the best of them is kept
    launchers: tuple[str, ...] = LAUNCHERS
    envs: tuple[str, ...] = ("default", "tuned")
    out: Path = Path("bench-results/threads")
    time_limit_s: float = 900.0

    def __post_init__(self) -> None:
        for name, low in (
            ("ranks", 2),
            ("width", 8),
            ("batch", 1),
            ("steps", 1),
            ("warmup", 1),
            ("rounds", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name} must be an int >= {low}, got {value!r}")
        bad = [name for name in self.launchers if name not in LAUNCHERS]
        if bad or not self.launchers:
            raise ValueError(f"--launchers must name some of {', '.join(LAUNCHERS)}, got {self.launchers}")
        if not {"default", "tuned"} <= set(self.envs) <= set(ENVIRONMENTS):
            raise ValueError(f"--envs must hold default and tuned, of {', '.join(ENVIRONMENTS)}: {self.envs}")


# ---- one rank ----------------------------------------------------------------------------


def _model(width: int) -> Any:
    import torch

    torch.manual_seed(0)  # the same model on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width),
        torch.nn.GELU(),
        torch.nn.Linear(2 * width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 2 * width),
    )


def _timed(fn: Any) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``: CPU counts every thread of this rank, spinning
    ones included, and hardly moves with the load of other programs on the machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def rank_main(rank: int, world: int, job: Path, ddp: bool) -> None:
    """Time one rank's steps into ``job/rank{rank}.json`` (the process group is up)."""
    import numba
    import torch
    import torch.distributed as dist

    import dlion

    cfg = json.loads((job / "config.json").read_text())
    width, steps, warmup = cfg["width"], cfg["steps"], cfg["warmup"]
    model = _model(width)
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own gradients and batches
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        q.grad = p.grad.clone()
    lion = dlion.DistributedLion(model.parameters(), lr=1e-5)
    adamw = torch.optim.AdamW(other.parameters(), lr=1e-5)
    times: dict[str, list[float]] = {
        k: [] for k in ("lion_step_s", "lion_cpu_s", "adamw_step_s", "adamw_cpu_s")
    }
    idle_ms = []
    dist.barrier()
    for i in range(warmup + steps):
        lion_t, adamw_t = _timed(lion.step), _timed(adamw.step)
        if i >= warmup:
            for name, (wall, cpu) in (("lion", lion_t), ("adamw", adamw_t)):
                times[f"{name}_step_s"].append(wall)
                times[f"{name}_cpu_s"].append(cpu)
    for _ in range(max(3, steps // 4)):
        lion.step()
        c0 = time.process_time()
        time.sleep(IDLE_S)
        idle_ms.append(1e3 * (time.process_time() - c0))
    result: dict[str, Any] = {
        "rank": rank,
        "n_params": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),  # as the last kernel left it, on this thread
        "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        **times,
        "idle_cpu_ms": idle_ms,
    }
    if ddp:
        result |= _iterations(model, cfg, gen)
    Path(job, f"rank{rank}.json").write_text(json.dumps(result))


def _iterations(model: Any, cfg: dict[str, Any], gen: Any) -> dict[str, list[float]]:
    """Whole iterations, alternately: DDP + AdamW, and DistributedLion without DDP."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import dlion

    ddp_model = DistributedDataParallel(copy.deepcopy(model))
    adamw = torch.optim.AdamW(ddp_model.parameters(), lr=1e-5)
    lion = dlion.DistributedLion(model.parameters(), lr=1e-5)
    x = torch.randn(cfg["batch"], cfg["width"], generator=gen)
    y = torch.randn(cfg["batch"], 2 * cfg["width"], generator=gen)

    def iteration(net: Any, opt: Any) -> None:
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()

    ddp_s, lion_s = [], []
    for i in range(cfg["warmup"] + cfg["steps"]):
        a, _ = _timed(lambda: iteration(ddp_model, adamw))
        b, _ = _timed(lambda: iteration(model, lion))
        if i >= cfg["warmup"]:
            ddp_s.append(a)
            lion_s.append(b)
    return {"ddp_iter_s": ddp_s, "lion_iter_s": lion_s}


def _spawned(rank: int, world: int, job: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=Path(job, "store").as_uri(), rank=rank, world_size=world)
    try:
        rank_main(rank, world, Path(job), ddp=False)
    finally:
        dist.destroy_process_group()


def _torchrun_rank(job: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank_main(dist.get_rank(), dist.get_world_size(), Path(job), ddp=True)
    finally:
        dist.destroy_process_group()


def _spawn_job(job: str, world: int) -> None:
    import torch.multiprocessing as tmp

    tmp.spawn(_spawned, args=(world, job), nprocs=world)


# ---- the driver --------------------------------------------------------------------------


def environment(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(ENVIRONMENTS[name])
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def launch(cfg: ThreadsBenchConfig, launcher: str, env_name: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dlion-threads-") as job:
        Path(job, "config.json").write_text(json.dumps({**asdict(cfg), "out": str(cfg.out)}))
        me = [sys.executable, "-m", "bench.threads"]
        if launcher == "spawn":
            cmd = [*me, "--spawn-job", job, "--ranks", str(cfg.ranks)]
        else:
            run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*run, "--nproc-per-node", str(cfg.ranks), "-m", "bench.threads", "--torchrun-job", job]
        proc = subprocess.run(
            cmd, env=environment(env_name), timeout=cfg.time_limit_s, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{launcher} / {env_name} failed with exit status {proc.returncode}")
        return [json.loads(Path(job, f"rank{r}.json").read_text()) for r in range(cfg.ranks)]


def slowest_median_ms(ranks: list[dict[str, Any]], key: str) -> float:
    per_step = [max(r[key][i] for r in ranks) for i in range(len(ranks[0][key]))]
    return 1e3 * sorted(per_step)[len(per_step) // 2]


def summarise(launcher: str, env_name: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    idle = [ms for r in ranks for ms in r["idle_cpu_ms"]]
    row = {
        "launcher": launcher,
        "env": env_name,
        "n_params": ranks[0]["n_params"],
        "torch_threads": ranks[0]["torch_threads"],
        "numba_threads": ranks[0]["numba_threads"],
        "lion_step_ms": slowest_median_ms(ranks, "lion_step_s"),
        "adamw_step_ms": slowest_median_ms(ranks, "adamw_step_s"),
        "lion_cpu_ms": slowest_median_ms(ranks, "lion_cpu_s"),
        "adamw_cpu_ms": slowest_median_ms(ranks, "adamw_cpu_s"),
        "idle_cpu_ms": sorted(idle)[len(idle) // 2],
    }
    if "ddp_iter_s" in ranks[0]:
        row["ddp_iter_ms"] = slowest_median_ms(ranks, "ddp_iter_s")
        row["lion_iter_ms"] = slowest_median_ms(ranks, "lion_iter_s")
    return row


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each time's minimum over rounds: other load on the machine only ever adds time."""
    row = {**rounds[0], "rounds": len(rounds)}
    for key in row:
        if key.endswith("_ms"):
            row[key] = min(r[key] for r in rounds)
    return row


def render(cfg: ThreadsBenchConfig, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{rows[0]['n_params']:,} parameters, {cfg.ranks} Gloo ranks on {os.cpu_count()} cores; "
        f"{cfg.steps} timed steps after {cfg.warmup}, median of the slowest rank, best of "
        f"{cfg.rounds} interleaved launches. tuned: "
        "NUMBA_NUM_THREADS=1 OMP_WAIT_POLICY=passive; idle CPU: ms of CPU a rank burns in "
        f"{IDLE_S * 1e3:.0f} ms of sleep after a DistributedLion step.",
        "",
        "| launcher | environment | torch / numba threads | DistributedLion step ms (CPU ms) "
        "| AdamW step ms (CPU ms) | idle CPU ms |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['launcher']} | {r['env']} | {r['torch_threads']} / {r['numba_threads']} "
            f"| {r['lion_step_ms']:.1f} ({r['lion_cpu_ms']:.1f}) | {r['adamw_step_ms']:.1f} "
            f"({r['adamw_cpu_ms']:.1f}) | {r['idle_cpu_ms']:.2f} |"
        )
    lines += [
        "",
        "| launcher | default / tuned: DistributedLion step | AdamW step | within 10% "
        "| CPU: DistributedLion | AdamW |",
        "|---|--:|--:|---|--:|--:|",
    ]
    for launcher in cfg.launchers:
        d, t = (
            next(r for r in rows if r["launcher"] == launcher and r["env"] == e) for e in ("default", "tuned")
        )
        lion, adamw = (d[f"{k}_step_ms"] / t[f"{k}_step_ms"] for k in ("lion", "adamw"))
        lion_cpu, adamw_cpu = (d[f"{k}_cpu_ms"] / t[f"{k}_cpu_ms"] for k in ("lion", "adamw"))
        ok = "PASS" if max(abs(lion - 1), abs(adamw - 1)) <= TARGET else "MISS"
        lines.append(f"| {launcher} | {lion:.2f} | {adamw:.2f} | {ok} | {lion_cpu:.2f} | {adamw_cpu:.2f} |")
    ddp = [r for r in rows if "ddp_iter_ms" in r]
    if ddp:
        lines += [
            "",
            "| torchrun, environment | DDP + AdamW iteration ms | DistributedLion iteration ms | ratio |",
            "|---|--:|--:|--:|",
        ]
        for r in ddp:
            ratio = r["lion_iter_ms"] / r["ddp_iter_ms"]
            lines.append(f"| {r['env']} | {r['ddp_iter_ms']:.1f} | {r['lion_iter_ms']:.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a run of under a minute: {QUICK}")
    p.add_argument("--ranks", type=int, default=4, help="Gloo ranks per launch (default: %(default)s)")
    for name in ("width", "batch", "steps", "warmup", "rounds"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--launchers", default=None, help=f"comma-separated, of {','.join(LAUNCHERS)}")
    p.add_argument("--envs", default=None, help=f"comma-separated, of {','.join(ENVIRONMENTS)}")
    p.add_argument("--out", type=Path, default=Path("bench-results/threads"), help="default: %(default)s")
    p.add_argument("--spawn-job", help=argparse.SUPPRESS)
    p.add_argument("--torchrun-job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.spawn_job:
        _spawn_job(args.spawn_job, args.ranks)
        return 0
    if args.torchrun_job:
        _torchrun_rank(args.torchrun_job)
        return 0
    given: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("width", "batch", "steps", "warmup", "rounds")
        if getattr(args, k) is not None
    }
    for name in ("launchers", "envs"):
        if getattr(args, name) is not None:
            given[name] = tuple(s for s in getattr(args, name).split(",") if s)
    try:
        cfg = ThreadsBenchConfig(ranks=args.ranks, out=args.out, **{**(QUICK if args.quick else {}), **given})
    except ValueError as e:
        p.error(str(e))
    cfg.out.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {
        (la, e): [] for la in cfg.launchers for e in cfg.envs
    }
    for i in range(cfg.rounds):
        for (launcher, env_name), done in runs.items():
            t0 = time.perf_counter()
            done.append(summarise(launcher, env_name, launch(cfg, launcher, env_name)))
            print(f"round {i + 1}, {launcher} / {env_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [best(done) for done in runs.values()]
    table = render(cfg, rows)
    (cfg.out / "threads.md").write_text(table + "\n")
    config = {**asdict(cfg), "out": str(cfg.out)}
    every = [r for done in runs.values() for r in done]
    (cfg.out / "threads.json").write_text(
        json.dumps({"config": config, "rows": rows, "runs": every}, indent=1)
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

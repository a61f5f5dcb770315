"""One rank of the emulated-cluster communication benchmark: ``python -m bench.netcomm.rank SPEC``.

torchrun starts one per emulated host (``launch.cluster.run_on_hosts``); ranks
join a Gloo group over the hosts' shaped links. For each model size, every rank builds the
same parameters (``bench.netcomm.model.tensor_shapes``) and its own seeded gradients, once; then
for each case, with the parameters reset to their seeded values:

  1. build the optimizer (the registry's; DGC without its warm-up, see ``build``);
  2. ``warmup`` steps: numba compiles, buffers are allocated, the first step's one-off
     fingerprint exchange happens;
  3. ``steps`` timed steps. Before each, the gradients are copied back in (optimizers
     overwrite ``.grad`` with the average) and every rank meets at a barrier; only
     ``opt.step()`` is timed, so the timed region holds the optimizer and its communication;
  4. this host's eth0 counters (read from /proc/net inside its namespace) before and after
     the timed steps, beside the ledger's bytes of every step.

Each rank writes ``rank{r}.json`` to the spec's folder; the driver (``bench.netcomm``)
takes the slowest rank of each step. A failure is recorded for the launcher, which names
the host and rank.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.netcomm.model import Case, case_by_label, tensor_shapes
from dlion.train.dist import record_failure, set_thread_counts
from dlion.worker.baselines.dgc import DGC, DGCConfig
from dlion.worker.catalogue import build_optimizer
from launch.netns import IFNAME, HostCounters, NetnsError, parse_counters

LR = 1e-4
BETA1 = 0.9


@dataclass(frozen=True, kw_only=True)
class RankSpec:
    """What every rank of one launch measures; JSON in a folder all hosts can read."""

    sizes: tuple[int, ...]
    cases: tuple[str, ...]  # Case labels
    steps: int
    warmup: int
    out_dir: str
    timeout_s: float
    seed: int = 0

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> RankSpec:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "sizes": tuple(raw["sizes"]), "cases": tuple(raw["cases"])})


def build(case: Case, params: list[torch.nn.Parameter], seed: int) -> Any:
    """The optimizer of ``case``. DGC is built as the registry builds it, but at its final
    density from the first step: the registry's DGC warms up over 20 steps, sending up to
    250x more, and the benchmark measures the steady state."""
    if case.optimizer == "dgc":
        config = DGCConfig(momentum=BETA1, seed=seed, backend=case.backend, warmup_steps=0)  # type: ignore[arg-type]
        return DGC(params, lr=LR, weight_decay=0.0, config=config)
    return build_optimizer(
        case.optimizer, params, lr=LR, weight_decay=0.0, seed=seed, backend=case.backend or "allgather"
    )


def reset_params(params: list[torch.nn.Parameter], seed: int) -> None:
    """The same values on every rank and before every case."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = None


def make_grads(shapes: list[tuple[int, ...]], seed: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    return [torch.randn(s, generator=gen) for s in shapes]


def host_counters() -> HostCounters | None:
    """This host's eth0 counters (None outside an emulated host: no eth0 of ours to read)."""
    try:
        text = Path("/proc/net/dev").read_text() + Path("/proc/net/snmp").read_text()
        return parse_counters(text, IFNAME)
    except (OSError, NetnsError):
        return None


def settle() -> None:
    """Free what the last case left, then exempt every survivor from later collections: a
    full collection walks torch's and numba's millions of objects (about 1 s), and one
    could otherwise fall inside a timed step."""
    gc.collect()
    gc.freeze()


def measure(
    case: Case, params: list[torch.nn.Parameter], grads: list[torch.Tensor], spec: RankSpec
) -> dict[str, Any]:
    reset_params(params, spec.seed)
    opt = build(case, params, spec.seed)
    times: list[float] = []
    before = None
    for i in range(spec.warmup + spec.steps):
        if i == spec.warmup:
            dist.barrier()
            before = host_counters()
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    after = host_counters()
    iface = asdict(after - before) if after is not None and before is not None else None
    step_bytes = opt.ledger.step_bytes()
    del opt
    for p in params:
        p.grad = None
    settle()
    return {"times_s": times[spec.warmup :], "step_bytes": step_bytes, "iface": iface}


def run_size(size: int, spec: RankSpec, rank: int) -> dict[str, Any]:
    shapes = tensor_shapes(size)
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    grads = make_grads(shapes, spec.seed, rank)
    cases = {}
    for label in spec.cases:
        t0 = time.monotonic()
        cases[label] = measure(case_by_label(label), params, grads, spec)
        if rank == 0:
            print(f"  {size:,} parameters, {label}: {time.monotonic() - t0:.1f} s", flush=True)
    del params, grads
    settle()
    return {"shapes": shapes, "cases": cases}


def main(argv: list[str]) -> None:
    spec = RankSpec.load(argv[0])
    set_thread_counts(1)  # this host's cores (the launcher pins each host to its share)
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec.timeout_s))
    settle()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"  {world} ranks joined", flush=True)
    sizes = {str(size): run_size(size, spec, rank) for size in spec.sizes}
    out = {
        "rank": rank,
        "world": world,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sizes": sizes,
    }
    tmp = Path(spec.out_dir) / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(tmp.with_suffix(""))
    dist.barrier()  # nobody leaves while another still needs the group


if __name__ == "__main__":
    code = 0
    try:
        main(sys.argv[1:])
    except BaseException as exc:
        record_failure(exc)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown, as dlion.train does: a Gloo thread can abort it.
    os._exit(code)

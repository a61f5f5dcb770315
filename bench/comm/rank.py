"""One rank of a communication benchmark launch: every variant on the same parameters.

A launch is one transport at one N. Each rank builds the same synthetic parameters, its
own seeded gradients, and runs every variant in turn: a warm-up step (which also carries
DistributedLion's one-off fingerprint exchange), then ``steps`` timed steps, each after a
barrier. It writes its ledger bytes and step times to ``rank{r}.json`` in the launch folder.
"""

from __future__ import annotations

import functools
import gc
import json
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from bench.comm.model import Variant, by_label
from dlion import DistributedLion, GlobalOptimizer, ParameterServer, split_server
from dlion.server import Roles

LR = 1e-4
BUCKET_NUMEL = 1 << 25  # DistributedLion's default
# Fractions of the parameters in the big tensors; then two small ones. Odd sizes: no tensor
# fills whole bytes of sign bits, so per-tensor byte padding shows in the ledger.
_FRACTIONS = (0.41, 0.27, 0.17, 0.09)
_SMALL = (1021, 3)


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """What one launch measures; written as JSON for the ranks to read."""

    transport: str
    world: int
    params: int
    steps: int
    variants: tuple[str, ...]
    out_dir: str
    timeout_s: float
    seed: int = 0
    bucket_numel: int = BUCKET_NUMEL
    dedicated: bool = False  # the last of ``world`` ranks is a parameter-server process

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> LaunchSpec:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "variants": tuple(raw["variants"])})


def tensor_numels(total: int) -> list[int]:
    """A handful of awkward (odd) tensor sizes adding up to exactly ``total``."""
    sizes: list[int] = []
    left = total
    for n in [int(total * f) | 1 for f in _FRACTIONS] + list(_SMALL):
        if n >= left:
            break
        sizes.append(n)
        left -= n
    return [*sizes, left]


def make_params(numels: list[int], seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen) * 0.02) for n in numels]


def make_grads(numels: list[int], seed: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank + 1)
    return [torch.randn(n, generator=gen) for n in numels]


def build(
    variant: Variant, params: list[torch.nn.Parameter], spec: LaunchSpec, roles: Roles | None = None
) -> Any:
    timeout = timedelta(seconds=spec.timeout_s)
    if variant.optimizer == "fp32":
        inner = torch.optim.SGD(params, lr=LR)
        return GlobalOptimizer(inner, wire_dtype="float32", transport=spec.transport, timeout=timeout)
    return DistributedLion(
        params,
        lr=LR,
        vote=variant.vote,  # type: ignore[arg-type]
        backend=variant.backend,
        transport=spec.transport,
        seed=spec.seed,
        bucket_numel=spec.bucket_numel,
        timeout=timeout,
        process_group=roles.workers if roles else None,
        server=roles.link if roles else None,
    )


def load_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Fresh copies each step: GlobalOptimizer overwrites .grad with the average."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def measure(
    variant: Variant,
    params: list[torch.nn.Parameter],
    grads: list[torch.Tensor],
    barrier: Callable[[], None],
    spec: LaunchSpec,
    roles: Roles | None = None,
) -> dict[str, Any]:
    opt = build(variant, params, spec, roles)
    times: list[float] = []
    for _ in range(1 + spec.steps):
        load_grads(params, grads)
        barrier()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    if roles is not None:
        opt.close()  # the server's loop ends once every worker has closed
    step_bytes = opt.ledger.step_bytes()
    del opt
    for p in params:
        p.grad = None
    gc.collect()
    return {"step_bytes": step_bytes, "times_s": times[1:]}


def measure_with_server(
    variant: Variant, params: list[torch.nn.Parameter], grads: list[torch.Tensor], spec: LaunchSpec
) -> dict[str, Any]:
    """Ranks 0..N-1 measure as workers; the last rank serves and records its own bytes."""
    roles = split_server(transport=spec.transport, timeout=timedelta(seconds=spec.timeout_s))
    if roles.is_server:
        server = ParameterServer(roles.link)
        server.serve()
        return {"step_bytes": server.ledger.step_bytes(), "times_s": [0.0] * spec.steps}
    if spec.transport == "mpi":
        barrier = roles.workers.Barrier
    else:
        barrier = functools.partial(torch.distributed.barrier, group=roles.workers)
    return measure(variant, params, grads, barrier, spec, roles)


def run_rank(spec: LaunchSpec, rank: int, barrier: Callable[[], None]) -> None:
    numels = tensor_numels(spec.params)
    params = make_params(numels, spec.seed)
    grads = make_grads(numels, spec.seed, rank)
    if spec.dedicated:
        results = {
            label: measure_with_server(by_label(label), params, grads, spec) for label in spec.variants
        }
    else:
        results = {label: measure(by_label(label), params, grads, barrier, spec) for label in spec.variants}
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"rank": rank, "numels": numels, "peak_rss_mib": peak_mib, "variants": results}
    tmp = Path(spec.out_dir) / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(out))
    tmp.rename(tmp.with_suffix(""))

"""One rank of the sharded benchmark: ``python -m bench.sharded.rank VARIANTS OUT WARMUP STEPS
D_MODEL LAYERS PER_HOST IFNAME``.

Every rank trains the same byte-level transformer (dlion.train.model.ByteGPT) on its own
batches, once per variant of the comma-separated VARIANTS, in order, in this one process
group (a launch costs more than a small variant's steps on 2 cores):

  ddp-fp32    DistributedDataParallel's fp32 all-reduce over every rank, then AdamW
  ddp-dlion   DDP with dlion.attach: the sharded vote over every rank, DistributedLion
  fsdp-adamw  fully_shard on a 1-D mesh of every rank (FSDP2), then AdamW
  hsdp-adamw  fully_shard on a 2-D (replicate = hosts, shard = the PER_HOST ranks of a host)
              mesh: reduce-scatter in the host, fp32 all-reduce of the shard across hosts; AdamW
  hsdp-dlion  the same mesh under dlion.attach: the shard's sharded vote across hosts instead

Global rank h*PER_HOST + l runs on host h (launch.cluster's layout, and torchrun's), so a
shard group is one host. After WARMUP untimed steps, STEPS steps are timed whole (forward,
backward, step), each between barriers; the bytes sent on IFNAME (a host's eth0, or lo on one
machine) and on lo are read before and after them. Memory is counted from tensors, each
rank's local part: parameters, gradients after the last backward, optimizer state. Each rank
writes OUT/<variant>.rank<r>.json.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BATCH, CONTEXT, HEADS = 8, 128, 4
VARIANTS = ("ddp-fp32", "ddp-dlion", "fsdp-adamw", "hsdp-adamw", "hsdp-dlion")


def interface_tx(ifname: str) -> tuple[int, int]:
    """(bytes, packets) sent on ``ifname`` in this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            fields = rest.split()
            return int(fields[8]), int(fields[9])
    raise RuntimeError(f"no interface {ifname!r} in /proc/net/dev")


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this rank holds of ``tensors``: a DTensor's local shard, a plain tensor whole."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return local_bytes(v for state in opt.state.values() for v in state.values())


@functools.cache
def mesh(shape: tuple[int, ...]) -> Any:
    """One mesh per shape for the whole launch: each builds process groups on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def build(variant: str, model: torch.nn.Module, per_host: int) -> tuple[torch.nn.Module, Any, Any]:
    """(the wrapped model, its optimizer, dlion's attachment or None)."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlion

    world = dist.get_world_size()
    if variant.startswith("ddp-"):
        net: torch.nn.Module = DDP(model)
    elif variant in ("fsdp-adamw", "hsdp-adamw", "hsdp-dlion"):
        shape = (world,) if variant == "fsdp-adamw" else (world // per_host, per_host)
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh(shape))
        fully_shard(model, mesh=mesh(shape))  # the root: embeddings, tied head, final norm
        net = model
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if variant.endswith("-dlion"):
        # Built after fully_shard, over its DTensors: the optimizer works on the local shards.
        opt: Any = dlion.DistributedLion(net.parameters(), lr=5e-4, weight_decay=0.1, backend="sharded")
        return net, opt, dlion.attach(net, opt)
    return net, torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.1), None


def ledger_per_step(opt: Any, steps: int) -> dict[str, float] | None:
    """Bytes this rank sent per timed step by scope: "net" across replicas (dlion's vote),
    "node" inside the shard group (FSDP's collectives, counted under attach)."""
    ledger = getattr(opt, "ledger", None)
    if ledger is None:
        return None
    timed = ledger.steps[-steps:]
    if ledger.keep_records is not None or len(timed) != steps:
        raise RuntimeError(f"the ledger kept {len(timed)} steps' records, {steps} timed")
    sent = {"net": 0, "node": 0}
    for records in timed:
        for r in records:
            sent[r.scope] += r.sent.bits
    return {scope: bits / 8 / steps for scope, bits in sent.items()} | {"steps": ledger.n_steps}


def barrier_tx(ifnames: list[str], count: int) -> dict[str, float]:
    """Bytes sent per barrier on each interface: what the timed loop's own barriers add to a
    step's traffic, so a report can tell the harness's share from the training's."""
    dist.barrier()
    before = {name: interface_tx(name)[0] for name in ifnames}
    for _ in range(count):
        dist.barrier()
    return {name: (interface_tx(name)[0] - before[name]) / count for name in ifnames}


def run_variant(variant: str, cfg: dict[str, Any], data: Any) -> dict[str, Any]:
    from dlion.train.data import BatchSampler
    from dlion.train.model import ByteGPT, ModelConfig

    rank, warmup, steps = dist.get_rank(), cfg["warmup"], cfg["steps"]
    model = ByteGPT(ModelConfig(context=CONTEXT, d_model=cfg["d_model"], layers=cfg["layers"], heads=HEADS))
    n_params = model.num_params()
    net, opt, attachment = build(variant, model, cfg["per_host"])
    sampler = BatchSampler(data, batch_size=BATCH, context=CONTEXT, seed=0, rank=rank)
    times, losses, grads = [], [], 0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            tx0 = {name: interface_tx(name) for name in cfg["ifnames"]}
        dist.barrier()
        t0 = time.perf_counter()
        x, y = sampler.next()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        if step == warmup + steps - 1:  # the gradients as the optimizer gets them
            grads = local_bytes(p.grad for p in net.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    dist.barrier()
    tx1 = {name: interface_tx(name) for name in cfg["ifnames"]}
    tx = {name: (tx1[name][0] - tx0[name][0]) / steps for name in cfg["ifnames"]}
    packets = {name: (tx1[name][1] - tx0[name][1]) / steps for name in cfg["ifnames"]}
    record = {
        "variant": variant,
        "rank": rank,
        "world": dist.get_world_size(),
        "per_host": cfg["per_host"],
        "n_params": n_params,
        "param_bytes": local_bytes(net.parameters()),
        "grad_bytes": grads,
        "state_bytes": state_bytes(opt),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "tx_bytes_per_step": tx,  # by interface; each host's ranks read the same counters
        "tx_packets_per_step": packets,
        "barrier_tx_bytes": barrier_tx(cfg["ifnames"], steps),  # the timed loop runs one a step
        "ledger_bytes_per_step": ledger_per_step(opt, steps),
        "losses": losses,
        "loadavg_1min": os.getloadavg()[0],  # this machine's: other jobs slow the steps down
    }
    if attachment is not None:
        attachment.detach()
    return record


def main() -> None:
    variants = sys.argv[1].split(",")
    out = Path(sys.argv[2])
    warmup, steps, d_model, layers, per_host = (int(x) for x in sys.argv[3:8])
    ifname = sys.argv[8]
    from dlion.train.data import CorpusConfig, load_corpus
    from dlion.train.dist import set_thread_counts

    dist.init_process_group("gloo")
    set_thread_counts(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if dist.get_world_size() % per_host:
        raise ValueError(f"world size {dist.get_world_size()} is not a multiple of {per_host} ranks per host")
    cfg = {
        "warmup": warmup, "steps": steps, "d_model": d_model, "layers": layers, "per_host": per_host,
        "ifnames": sorted({ifname, "lo"}),  # lo: what the ranks of one host send each other
    }  # fmt: skip
    data = load_corpus(CorpusConfig(max_bytes=2_000_000)).train
    for variant in variants:
        record = run_variant(variant, cfg, data)
        (out / f"{variant}.rank{record['rank']}.json").write_text(json.dumps(record))
        gc.collect()  # the last variant's model, groups' buffers and hooks go before the next
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()

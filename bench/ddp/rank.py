"""One rank of the DDP benchmark:
``python -m bench.ddp.rank VARIANT OUT WARMUP STEPS D_MODEL LAYERS IFNAME BATCH``.

Every rank trains the same byte-level transformer (dlion.train.model.ByteGPT) on its own
batches; only the way gradients meet differs by VARIANT:

  ddp-fp32        DistributedDataParallel's all-reduce, then AdamW
  ddp-powersgd-rK torch's PowerSGD DDP hook at rank K (error feedback, warm start; its
                  uncompressed warm-up ends after the first 2 steps), then AdamW
  ddp-dlion       DDP with dlion.attach: the vote in DDP's hook, DistributedLion (sharded)
  dlion           DistributedLion (sharded) without DDP

After WARMUP untimed steps (compilation, DDP's bucket rebuild, PowerSGD's warm-up), STEPS
steps are timed whole (forward, backward, step), each between barriers; the bytes sent on
IFNAME (eth0 inside an emulated host, lo on one machine) are read before and after them. Each rank
writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CONTEXT = 128


def interface_tx(ifname: str) -> int:
    """Bytes sent on ``ifname`` in this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            return int(rest.split()[8])
    raise RuntimeError(f"no interface {ifname!r} in /proc/net/dev")


def build(variant: str, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlion

    if variant == "dlion":
        return model, dlion.DistributedLion(model.parameters(), lr=5e-4, weight_decay=0.1, backend="sharded")
    ddp = DDP(model)
    if variant == "ddp-dlion":
        opt: Any = dlion.DistributedLion(model.parameters(), lr=5e-4, weight_decay=0.1, backend="sharded")
        dlion.attach(ddp, opt)
        return ddp, opt
    if variant.startswith("ddp-powersgd-r"):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        rank = int(variant.removeprefix("ddp-powersgd-r"))
        state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=rank, start_powerSGD_iter=2)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    elif variant != "ddp-fp32":
        raise ValueError(f"unknown variant {variant!r}")
    return ddp, torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)


def main() -> None:
    variant, out = sys.argv[1], Path(sys.argv[2])
    warmup, steps, d_model, layers = (int(x) for x in sys.argv[3:7])
    ifname, batch = sys.argv[7], int(sys.argv[8])
    from dlion.train.data import BatchSampler, CorpusConfig, load_corpus
    from dlion.train.dist import set_thread_counts
    from dlion.train.model import ByteGPT, ModelConfig

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    set_thread_counts(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    model = ByteGPT(ModelConfig(context=CONTEXT, d_model=d_model, layers=layers, heads=4), seed=0)
    net, opt = build(variant, model)
    data = load_corpus(CorpusConfig(max_bytes=2_000_000)).train
    sampler = BatchSampler(data, batch_size=batch, context=CONTEXT, seed=0, rank=rank)
    times, losses = [], []
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            tx0 = interface_tx(ifname)
        dist.barrier()
        t0 = time.perf_counter()
        x, y = sampler.next()
        loss = torch.nn.functional.cross_entropy(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    dist.barrier()
    tx1 = interface_tx(ifname)
    ledger = getattr(opt, "ledger", None)
    record = {
        "variant": variant,
        "rank": rank,
        "world": world,
        "n_params": sum(p.numel() for p in model.parameters()),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "interface": ifname,
        "interface_tx_bytes_per_step": (tx1 - tx0) / steps,
        "ledger_sent_bytes_per_step": (
            sum(s for s, _ in ledger.step_bytes()[warmup:]) / steps if ledger is not None else None
        ),
        "losses": losses,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()

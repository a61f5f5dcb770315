"""One rank of an FSDP2/HSDP framework run, under torchrun on 4 Gloo ranks laid out as 2 replicas
x 2 shards: the tiny GPT-2 of tests/frameworks_job.py, each block and the root sharded with
fully_shard on the 2-D mesh, trained by DistributedLion under dlion.attach, or by torch AdamW
with FSDP's own all-reduce across replicas for the reference.

    torchrun --standalone --nproc-per-node 4 tests/frameworks_fsdp_job.py MODE OUT_DIR [STEPS]

MODE: lightning-dlion (ModelParallelStrategy, DistributedLion from configure_optimizers,
dlion.integrations.lightning.DistributedLionCallback in the Trainer), lightning-adamw (the same
Trainer, torch AdamW, no dlion), accelerate-dlion (Accelerate's FSDP2 plugin promoted onto the
CPU, below; DistributedLion through prepare, then dlion.attach).

The wire is read in phases: every rank meets a barrier at the start of each batch, after its
backward (Lightning's on_before_optimizer_step, inside the optimizer's closure) and after its
step, and rank 0 reads the namespace's loopback counter there. FSDP's all-gathers and
reduce-scatters (inside the shard group) and, under AdamW, its all-reduce across replicas run
in forward and backward; DistributedLion votes across replicas in step(), so the step phase
is dlion's wire alone. FSDP's collectives are also counted as they run (dlion's ledger, scope
"node"; in the AdamW run the same counter on a ledger of the job's own), and each FSDP
group's parameter count is written, so the test can check the counts from the shapes.

Each rank writes OUT_DIR/rank<r>.json: losses, a hash of the full parameters (full_tensor),
per-step ledger bytes by scope, the FSDP groups, and on rank 0 the loopback readings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from frameworks_job import BATCH, Windows, lo_tx_bytes, model

REPLICAS, SHARDS = 2, 2
LR_DLION, LR_ADAMW = 3e-3, 1e-3


class Phases:
    """Loopback readings on rank 0 at each phase boundary, after a barrier on every rank:
    (step, phase, bytes), phase "start" (before forward), "backward" (before the optimizer's
    work) or "end" (after step)."""

    def __init__(self) -> None:
        self.readings: list[tuple[int, str, int]] = []

    def mark(self, step: int, phase: str) -> None:
        dist.barrier()  # every rank's collectives so far are done
        if dist.get_rank() == 0:
            self.readings.append((step, phase, lo_tx_bytes()))
        dist.barrier()  # and no rank starts the next ones (in its own shard group) before the reading


def unique_groups(net: torch.nn.Module) -> list[tuple[Any, list[str]]]:
    """FSDP2's parameter groups, each once, with the FSDP modules that share it
    (``fully_shard([norm, head])`` gives two modules one state)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    groups: dict[int, tuple[Any, list[str]]] = {}
    for name, m in net.named_modules():
        if isinstance(m, FSDPModule):
            for g in fully_shard.state(m)._fsdp_param_groups:  # type: ignore[attr-defined]
                groups.setdefault(id(g), (g, []))[1].append(name or "<root>")
    return list(groups.values())


def fsdp_groups(net: torch.nn.Module) -> list[dict[str, Any]]:
    """Each FSDP parameter group: its elements (whole and this rank's padded shard), the shard
    group's size, whether forward reshards it (then backward all-gathers it again), and the
    modules that hold it."""
    return [
        {
            "numel": sum(fp.sharded_param.numel() for fp in g.fsdp_params),
            "shard_numel": sum(fp._sharded_param_data.numel() for fp in g.fsdp_params),
            "shard_group": g.mesh_info.shard_mesh_size,
            "reshard": g.post_forward_mesh_info is not None,
            "element_bytes": g.fsdp_params[0].sharded_param.element_size(),
            "modules": modules,
        }
        for g, modules in unique_groups(net)
    ]


def restored_after_detach(net: torch.nn.Module) -> bool:
    """After ``detach()``: every group has FSDP's own collectives and its 2-D mesh back."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import HSDPMeshInfo

    from dlion.integrations.fsdp import CountedAllGather, CountedReduceScatter

    return all(
        isinstance(g.mesh_info, HSDPMeshInfo)
        and not isinstance(g._all_gather_comm, CountedAllGather)
        and not isinstance(g._reduce_scatter_comm, CountedReduceScatter)
        for g, _ in unique_groups(net)
    )


def count_fsdp(net: torch.nn.Module) -> Any:
    """FSDP's all-gathers and reduce-scatters counted on a ledger of our own, with dlion's
    counter and nothing else changed (the AdamW run: FSDP keeps its all-reduce)."""
    from dlion.integrations.fsdp import CountedAllGather, CountedReduceScatter
    from dlion.ledger import Ledger

    ledger = Ledger()
    for g, _ in unique_groups(net):
        g._all_gather_comm = CountedAllGather(g._all_gather_comm, ledger, "all_gather")
        g._reduce_scatter_comm = CountedReduceScatter(g._reduce_scatter_comm, ledger, "reduce_scatter")
    return ledger


def ledger_steps(ledger: Any) -> list[dict[str, int]]:
    """Bytes sent by this rank in each step, by scope: "net" (dlion's, across replicas) and
    "node" (FSDP's, inside the shard group)."""
    rows = []
    for recs in ledger.steps:
        row = {"net": 0, "node": 0}
        for r in recs:
            row[r.scope] += r.sent.bits // 8
        rows.append(row)
    return rows


def full_digest(net: torch.nn.Module) -> str:
    """A hash of every full parameter (full_tensor: an all-gather over the whole mesh)."""
    h = hashlib.sha256()
    for p in net.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        h.update(full.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def loader_for(rank: int, world: int) -> Any:
    """Every rank its own batches: a world-size sampler (Lightning's default one splits over the
    data-parallel dimension alone, so the two ranks of a shard group would see the same)."""
    data = Windows()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(data, batch_size=BATCH, sampler=sampler)


def shard_gpt2(net: Any, mesh: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in net.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def run_lightning(optimizer: str, steps: int, out: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    import dlion
    from dlion.integrations.lightning import DistributedLionCallback

    phases, losses = Phases(), []
    callback = DistributedLionCallback()
    facts: dict[str, Any] = {}

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model()
            self.attachment: Any = None
            self.counter: Any = None

        def configure_model(self) -> None:
            mesh = self.device_mesh  # ("data_parallel", "tensor_parallel"): replicate x shard
            shard_gpt2(self.net, mesh)
            facts["mesh"] = list(mesh.mesh_dim_names)

        def configure_optimizers(self) -> Any:
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=LR_ADAMW)
            return dlion.DistributedLion(self.parameters(), lr=LR_DLION, weight_decay=0.1)

        def on_train_start(self) -> None:  # after the callback's on_train_start
            opt = self.trainer.optimizers[0]
            p0 = next(iter(self.net.parameters()))
            facts["placements"] = [str(pl) for pl in p0.placements]
            facts["opt_params_are_model_dtensors"] = {
                id(p) for g in opt.param_groups for p in g["params"]
            } == {id(p) for p in self.net.parameters()}
            if optimizer == "adamw":
                self.counter = count_fsdp(self.net)
                return
            facts["callback_attached"] = callback.attachment is not None
            if callback.attachment is None:  # the callback knows DDP only: attach here instead
                self.attachment = dlion.attach(self, opt)

        def on_train_batch_start(self, batch: Any, i: int) -> None:
            phases.mark(self.trainer.global_step + 1, "start")

        def training_step(self, batch: dict[str, torch.Tensor], i: int) -> torch.Tensor:
            return self.net(**batch).loss

        def on_before_optimizer_step(self, opt: Any) -> None:
            phases.mark(self.trainer.global_step + 1, "backward")

        def on_train_batch_end(self, outputs: Any, batch: Any, i: int) -> None:
            phases.mark(self.trainer.global_step, "end")
            losses.append(float(outputs["loss"]))
            if self.counter is not None and self.counter.in_step:
                self.counter.end_step()

        def on_train_end(self) -> None:  # after the callback's on_train_end, which detaches its own
            facts["groups"] = fsdp_groups(self.net)
            if optimizer == "dlion":
                if self.attachment is not None:
                    self.attachment.detach()
                facts["restored_after_detach"] = restored_after_detach(self.net)

    tiny = Tiny()
    trainer = pl.Trainer(
        accelerator="cpu", devices=REPLICAS * SHARDS, num_nodes=1, max_steps=steps,
        strategy=ModelParallelStrategy(data_parallel_size=REPLICAS, tensor_parallel_size=SHARDS),
        callbacks=[callback] if optimizer == "dlion" else [], use_distributed_sampler=False,
        enable_checkpointing=False, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / "pl"),
    )  # fmt: skip
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    trainer.fit(tiny, loader_for(rank, world))
    opt = trainer.optimizers[0]
    ledger = tiny.counter if optimizer == "adamw" else opt.ledger
    return {
        **facts,
        "losses": losses,
        "params": full_digest(tiny.net),
        "n_params": sum(p.numel() for p in tiny.net.parameters()),
        "ledger": ledger_steps(ledger),
        "phases": phases.readings,
        "counter_steps": getattr(opt, "steps_taken", None),
    }


def accelerator_fsdp2_on_cpu() -> Any:
    """Accelerate 1.16 on CPU, promoted to FSDP2 on a 2 x 2 (dp_replicate, dp_shard) mesh.

    A test-only device: Accelerate switches to DistributedType.FSDP only for GPU-like devices
    (accelerate/state.py); on CPU it drops the FSDP plugin silently, and a ParallelismConfig
    is refused. The state is promoted after the Accelerator is built, which is what a GPU run
    gets from ``Accelerator(fsdp_plugin=..., parallelism_config=...)``."""
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["GPT2Block"]
    )
    config = ParallelismConfig(dp_replicate_size=REPLICAS, dp_shard_size=SHARDS)
    accelerator.state.parallelism_config = config
    accelerator.state.device_mesh = config.get_device_mesh("cpu")
    config._validate_accelerator(accelerator)
    return accelerator


def run_accelerate(steps: int, out: Path) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    import dlion

    accelerator = accelerator_fsdp2_on_cpu()
    net = model()
    opt = dlion.DistributedLion(net.parameters(), lr=LR_DLION, weight_decay=0.1)
    before = {id(p) for p in net.parameters()}
    net, opt = accelerator.prepare(net, opt)  # shards in place; swaps the DTensors into the groups
    held = [p for g in opt.optimizer.param_groups for p in g["params"]]
    facts = {
        "is_fsdp2": bool(accelerator.is_fsdp2),
        "wrapper": type(opt).__name__,
        "opt_params_are_model_dtensors": {id(p) for p in held} == {id(p) for p in net.parameters()}
        and all(isinstance(p, DTensor) for p in held)
        and not any(id(p) in before for p in held),
        "placements": [str(pl) for pl in held[0].placements],
        "mesh": list(held[0].device_mesh.mesh_dim_names),
    }
    attachment = dlion.attach(net, opt)  # through the AcceleratedOptimizer wrapper
    facts["attached"] = bool(attachment.attached)
    phases, losses = Phases(), []
    batches = iter(loader_for(dist.get_rank(), dist.get_world_size()))
    for step in range(1, steps + 1):
        phases.mark(step, "start")
        loss = net(**next(batches)).loss
        accelerator.backward(loss)
        phases.mark(step, "backward")
        opt.step()
        opt.zero_grad()
        phases.mark(step, "end")
        losses.append(loss.item())
    inner = opt.optimizer
    groups = fsdp_groups(net)
    attachment.detach()
    facts["restored_after_detach"] = restored_after_detach(net)
    record = {
        **facts,
        "losses": losses,
        "params": full_digest(net),
        "n_params": sum(p.numel() for p in net.parameters()),
        "groups": groups,
        "ledger": ledger_steps(inner.ledger),
        "phases": phases.readings,
        "counter_steps": inner.steps_taken,
    }
    accelerator.wait_for_everyone()
    return record


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    t0 = time.perf_counter()
    if mode == "accelerate-dlion":
        record = run_accelerate(steps, out)
    else:
        record = run_lightning(mode.removeprefix("lightning-"), steps, out)
    record["seconds"] = time.perf_counter() - t0
    record["world"] = dist.get_world_size()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)  # skip interpreter teardown: nothing left to do


if __name__ == "__main__":
    main()

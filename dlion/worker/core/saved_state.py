"""Saved optimizer state when every rank's is its own (DistributedLion's momentum, DGC's
residuals): which entry a rank loads, loading without casting, and the collectives that save
it from every rank.

Frameworks written for DDP + AdamW save rank 0's optimizer state and load it on every rank,
which is right only when the ranks' states are equal. Two ways keep each rank's own:

- one file per rank (``save_optimizer_state`` / ``load_optimizer_state``): nothing is sent
  and no rank holds more than its own state; the folder must be there for every rank again
  at resume (a shared file system, or the same nodes);
- a gathered state (``gather_optimizer_state``): every rank's state in one object on the
  ranks that ask for it, for frameworks that write one file from rank 0 (dlion.integrations.hf
  and .lightning swap it in). ``load_state_dict`` takes it on every rank; each rank keeps
  its own entry.

A state that records its rank and world size (DistributedLion's) is refused by another rank,
or at another world size, with a ValueError that says what to do.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm
from dlion.worker.core.state import unwrapped

GATHERED = "dlion_every_rank"  # {GATHERED: [state of rank 0, state of rank 1, ...]}
CHUNK_BYTES = 1 << 26  # per rank per gather: bounds what a root holds on an NCCL device at once
STATE_FILE = "dlion-optimizer-rank{rank}-of-{world}.pt"
HOW = (
    "save each rank's own state (dlion.save_optimizer_state, or the state gathered from every rank: "
    "dlion.gather_optimizer_state; in Hugging Face's or Lightning's Trainer, the DistributedLionCallback "
    "of dlion.integrations.hf or .lightning) and load it on the same rank"
)


@runtime_checkable
class Saves(Protocol):
    """What these helpers need of an optimizer: every dlion.worker.core.base.CommOptimizer."""

    ledger: Ledger
    sharded: bool

    def comm_now(self) -> Comm | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def is_gathered(state_dict: Any) -> bool:
    return isinstance(state_dict, dict) and GATHERED in state_dict


def _place(comm: Comm | None) -> tuple[int, int]:
    """(rank, world size); a process without a group is rank 0 of 1."""
    return (comm.rank, comm.world_size) if comm is not None else (0, 1)


def own_state(state_dict: dict[str, Any], key: str, comm: Comm | None, optimizer: str) -> dict[str, Any]:
    """This rank's entry of ``state_dict`` (one rank's state, or every rank's gathered), refused
    if the state records another rank or world size. ``key``: where the optimizer keeps its
    counters (and, if it records them, ``rank`` and ``world_size``)."""
    who = f"{optimizer}.load_state_dict"
    rank, world = _place(comm)
    alone = "" if comm is not None else " (no torch.distributed process group exists yet: make it first)"
    if is_gathered(state_dict):
        states = state_dict[GATHERED]
        if len(states) != world:
            raise ValueError(
                f"{who}: the gathered state holds {len(states)} ranks' states, this job has {world} "
                f"rank(s){alone}: each rank's momentum is its own, so resume at world size {len(states)}"
            )
        state_dict = states[rank]
    saved = state_dict.get(key, {})
    if "rank" in saved and (int(saved["rank"]), int(saved["world_size"])) != (rank, world):
        was = f"rank {saved['rank']} of {saved['world_size']}"
        if int(saved["world_size"]) != world:
            raise ValueError(
                f"{who}: this state was saved by {was}, this optimizer is rank {rank} of {world}{alone}: "
                f"each rank's momentum is its own, so resume at world size {saved['world_size']} and {HOW}"
            )
        raise ValueError(
            f"{who}: this state was saved by {was}, this optimizer is rank {rank} of {world}: {HOW}"
        )
    return state_dict


def load_keeping_dtypes(
    load: Callable[[dict[str, Any]], None], optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """torch.optim's ``load`` (groups checked and swapped in), but each parameter's state in
    its saved dtype, moved to the parameter's device only: torch would cast floating state to
    the parameter's dtype, the fp32 momentum of bf16 parameters to bf16, for good. (torch's
    load hooks see the state empty: it is placed after.)"""
    saved = state_dict["state"]
    load({**state_dict, "state": {}})
    ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    by_id = dict(zip(ids, params, strict=True))
    for k, v in saved.items():
        p = by_id.get(k)
        if p is None:
            optimizer.state[k] = v  # state of no parameter, kept as saved (as torch keeps it)
        else:
            groups = state_dict["param_groups"]
            optimizer.state[p] = {key: _placed(p, key, value, k, groups) for key, value in v.items()}


def _placed(param: torch.Tensor, key: Any, value: Any, param_id: int, groups: list[dict[str, Any]]) -> Any:
    """A loaded state value where torch puts it, in its saved dtype: "step" by torch's own rule
    (on the host unless the optimizer is fused or capturable), any other tensor on the
    parameter's device."""
    if not isinstance(value, torch.Tensor):
        return value
    if key == "step":
        policy = torch.optim.Optimizer._process_value_according_to_param_policy
        return policy(param, value, param_id, groups, key)
    return value.to(device=param.device)


def dlion_optimizer(optimizer: Any) -> Saves:
    """The dlion optimizer, inside a framework's wrapper (Accelerate's, Lightning's) if need be;
    refused over FSDP-sharded parameters, whose ranks number their files and entries within one
    replicate group: there, torch.distributed.checkpoint saves every replica's state."""
    opt = unwrapped(optimizer, Saves, "expected a dlion optimizer (or a framework's wrapper of one)")
    if opt.sharded:
        raise ValueError(
            f"{type(opt).__name__} over FSDP-sharded parameters saves through torch.distributed.checkpoint "
            "(get_optimizer_state_dict / set_optimizer_state_dict: every replica's momentum, resharded on "
            "load), not dlion's per-rank files or gathered state (docs/fsdp.md)"
        )
    return opt


def gather_optimizer_state(optimizer: Any, *, receive: bool | None = None) -> dict[str, Any] | None:
    """Every rank's optimizer state in one object, on the ranks that receive it; None on the
    others. A collective: call it on every rank, in the same order as other collectives.

    ``receive``: whether this rank gets the gathered state (default: rank 0 only). Its tensors
    are on the CPU; save it as one file (``torch.save``), then on every rank hand it to
    ``load_state_dict`` (or the file to ``load_optimizer_state``), which keeps its own entry.
    A receiving rank holds every rank's state, world size times its own: for large models
    prefer ``save_optimizer_state``'s file per rank. The bytes go over the optimizer's own
    transport in chunks of ``CHUNK_BYTES`` per rank, each wait bounded by its timeout, and the
    ledger counts them as one-off bytes.
    """
    opt = dlion_optimizer(optimizer)
    comm = opt.comm_now()
    data = _to_bytes(opt.state_dict())
    if comm is None or comm.world_size == 1:
        return {GATHERED: [_from_bytes(data)]} if receive is not False else None
    wants = comm.rank == 0 if receive is None else receive
    head = comm.all_gather(torch.tensor([data.numel(), int(wants)], dtype=torch.int64), "saved state sizes")
    sizes, roots = head[:, 0].tolist(), [r for r, w in enumerate(head[:, 1].tolist()) if w]
    if not roots:
        raise ValueError("gather_optimizer_state: no rank receives the state; pass receive=True on one")
    gathered = None
    for root in roots:
        rows = _gather_bytes(comm, data, sizes, root)
        if rows is not None:
            gathered = {GATHERED: [_from_bytes(b) for b in rows]}
    _record(opt.ledger, comm, sizes, roots)
    return gathered


def _to_bytes(state: dict[str, Any]) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)


def _from_bytes(data: torch.Tensor) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(
        io.BytesIO(data.numpy().tobytes()), map_location="cpu", weights_only=True
    )
    return state


def _gather_bytes(comm: Comm, data: torch.Tensor, sizes: list[int], root: int) -> list[torch.Tensor] | None:
    """Every rank's ``data`` (``sizes[r]`` bytes on rank r) on ``root``, chunk by chunk."""
    longest = max(sizes)
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    for start in range(0, longest, CHUNK_BYTES):
        n = min(CHUNK_BYTES, longest - start)
        piece = torch.zeros(n, dtype=torch.uint8)
        mine = data[start : start + n]
        piece[: mine.numel()] = mine
        rows = comm.gather(piece, root, f"saved state bytes {start}..{start + n} of {longest} to rank {root}")
        if rows is not None:
            rows = rows.cpu()
            for r, size in enumerate(sizes):
                parts[r].append(rows[r, : max(0, min(n, size - start))])
    return [torch.cat(p) for p in parts] if comm.rank == root else None


def _record(ledger: Ledger, comm: Comm, sizes: list[int], roots: list[int]) -> None:
    """One-off bytes (outside any step): the sizes' all_gather, then each root's gather."""
    sent, received = all_gather_traffic(Traffic(metadata=128), comm.world_size)
    pad = [8 * (max(sizes) - s) for s in sizes]
    for root in roots:
        others = [r for r in range(comm.world_size) if r != root]
        if comm.rank == root:
            received += Traffic(
                payload=8 * sum(sizes[r] for r in others), padding=sum(pad[r] for r in others)
            )
        else:
            sent += Traffic(payload=8 * sizes[comm.rank], padding=pad[comm.rank])
    ledger.record_extra(CollectiveRecord("saved state", "gather", comm.world_size, sent, received))


def save_optimizer_state(optimizer: Any, path: str | os.PathLike[str]) -> Path:
    """Write this rank's optimizer state into the folder ``path``, one file per rank
    (``dlion-optimizer-rank{r}-of-{N}.pt``), and return the file. A collective: call it on
    every rank; it returns once every rank has written its file, and raises on every rank if
    one could not.

    One file per rank, not a gathered file: nothing is sent, no rank holds more than its own
    state, and the ranks write side by side. The folder must be there for every rank again at
    resume (a shared file system, or each node's own disk on the same nodes)::

        dlion.save_optimizer_state(opt, "ckpt/step-1000")   # every rank
        ...
        dlion.load_optimizer_state(opt, "ckpt/step-1000")   # every rank, same world size
    """
    opt = dlion_optimizer(optimizer)
    comm = opt.comm_now()
    rank, world = _place(comm)
    file = Path(path) / STATE_FILE.format(rank=rank, world=world)
    error = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        torch.save(opt.state_dict(), tmp)
        os.replace(tmp, file)  # a reader never sees half a file
    except Exception as err:  # re-raised below, once every rank knows that this one failed
        error = err
    _all_ok(comm, error, f"saving the optimizer state to {path}")
    return file


def load_optimizer_state(optimizer: Any, path: str | os.PathLike[str]) -> None:
    """Load this rank's optimizer state from ``path``: a folder ``save_optimizer_state`` wrote
    (this rank's file in it), or one file holding a gathered state (``gather_optimizer_state``)
    or a single process's state. A collective: call it on every rank; if any rank fails, every
    rank raises (the failing one its own error), so none goes on to wait for a rank that stopped.
    """
    opt = dlion_optimizer(optimizer)
    comm = opt.comm_now()
    rank, world = _place(comm)
    source = Path(path)
    error = None
    try:
        file = source / STATE_FILE.format(rank=rank, world=world) if source.is_dir() else source
        if source.is_dir() and not file.is_file():
            raise _missing(source, rank, world)
        opt.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    except Exception as err:  # re-raised below, once every rank knows that this one failed
        error = err
    _all_ok(comm, error, f"loading the optimizer state from {path}")


def _missing(folder: Path, rank: int, world: int) -> Exception:
    saved = sorted(p.name for p in folder.glob(STATE_FILE.format(rank="*", world="*")))
    if not saved:
        return FileNotFoundError(
            f"{folder} holds no optimizer state (no {STATE_FILE.format(rank='*', world='*')})"
        )
    return ValueError(
        f"{folder} holds no optimizer state for rank {rank} of {world}, only {', '.join(saved)}: each rank's "
        "momentum is its own, so resume with the world size it was saved at"
    )


def _all_ok(comm: Comm | None, error: Exception | None, what: str) -> None:
    """Every rank learns whether every rank succeeded; a failed rank raises its own error."""
    failed = [0] if error is not None else []
    if comm is not None and comm.world_size > 1:
        flags = comm.all_gather(torch.tensor([error is not None], dtype=torch.int32), f"{what}: outcome")
        failed = [r for r, bad in enumerate(flags[:, 0].tolist()) if bad]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"{what} failed on rank(s) {failed}; see their errors")

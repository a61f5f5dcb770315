"""Small metadata exchanges that keep every rank's decisions identical.

- ``check_fingerprint``: once, before any bucket collective, all ranks compare the
  parameter list (count, shapes, dtypes) and the optimizer config, so a mismatch is an
  error on every rank instead of mismatched buffer sizes.
- ``exchange_step_meta``: every step, which tensors have a gradient on each rank and
  the first non-finite gradient, so all ranks take the same branch (raise, skip, apply).
  The same int32 also says that a gradient changed after its vote began during backward
  (``changed_code``), so every rank refuses that step, or learns to vote in step(), together.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dlion import version
from dlion.kernels.common import upload
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm

FINGERPRINT_FIELDS = ("format+version", "tensors", "elements", "shapes+dtypes", "config")
_FORMAT = 1  # bump when the wire format changes


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def changed_code(index: int) -> int:
    """The metadata's int32 for "the gradient of tensor ``index`` changed after its vote began":
    -2 - index (-1 says all is well, >= 0 names a non-finite gradient)."""
    return -2 - index


def local_code(bad: int, changed: int) -> int:
    """A rank's int32 of the step metadata: its first non-finite gradient (``bad``), else its
    first changed one (``changed_code``), else -1. A non-finite gradient wins, here and across
    ranks (``_verdict``): that step is skipped or raises, so nothing is applied either way."""
    return bad if bad >= 0 else changed_code(changed) if changed >= 0 else -1


def check_fingerprint(
    comm: Comm,
    params: Sequence[torch.Tensor],
    config_text: str,
    ledger: Ledger,
    *,
    gradients: int = 0,
    one_off: bool = False,
) -> list[int]:
    """Raise ValueError on every rank if any rank's parameters or config differ. The exchange
    also carries a digest of each rank's first gradients, which may differ (they should):
    returns every rank's. ``one_off``: outside any step (when the optimizer is built)."""
    shapes = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    # Ranks on another dlion release may round or lay out bits differently: refuse them too.
    release = _crc(f"wire format {_FORMAT}, dlion {version.VERSION}")
    mine = [release, len(params), sum(p.numel() for p in params), _crc(shapes), _crc(config_text), gradients]
    send = torch.tensor(mine, dtype=torch.int64)
    gathered = comm.all_gather(send, "fingerprint all_gather").cpu().tolist()
    sent, received = all_gather_traffic(Traffic(metadata=64 * len(mine)), comm.world_size)
    rec = CollectiveRecord("fingerprint", "all_gather", comm.world_size, sent, received)
    ledger.record_extra(rec) if one_off else ledger.record(rec)
    diffs = [
        f"rank {r} {name}={theirs[i]} vs rank 0 {name}={gathered[0][i]}"
        for r, theirs in enumerate(gathered)
        for i, name in enumerate(FINGERPRINT_FIELDS)
        if theirs[i] != gathered[0][i]
    ]
    if diffs:
        raise ValueError(
            "ranks disagree on the dlion release, the parameter list or the optimizer config "
            "(every rank must run the same dlion and build the same model and optimizer): " + "; ".join(diffs)
        )
    return [row[len(FINGERPRINT_FIELDS)] for row in gathered]


@dataclass(frozen=True)
class StepMeta:
    """What all ranks agree on before the sign step. Agreed on the device
    (``exchange_step_meta_on_device``), ``present`` is a device bool[T], ``go`` a device
    flag (every rank finite), ``bad_by_rank`` the device int32[N] of each rank's first
    non-finite tensor, and ``bad_rank`` -1 until the host reads them (the error path only)."""

    present: Any  # bool[T]: some rank has a gradient for tensor t (NumPy, or a device tensor)
    bad_rank: int  # first rank with a non-finite gradient, or -1
    bad_index: int  # that rank's first non-finite tensor, or -1
    go: torch.Tensor | None = None
    bad_by_rank: torch.Tensor | None = None
    changed_rank: int = -1  # first rank whose gradient changed after its vote began, or -1
    changed_index: int = -1  # that rank's first such tensor

    def settle(self) -> StepMeta:
        """The host's view of a device agreement (reads the device: the error path only)."""
        if self.bad_by_rank is None:
            return self
        return _verdict(self.present.cpu().numpy(), self.bad_by_rank.cpu().numpy())


def _gather_meta(comm: Comm, send: torch.Tensor, ledger: Ledger) -> torch.Tensor:
    gathered = comm.all_gather(send, "step metadata all_gather")
    sent, received = all_gather_traffic(Traffic(metadata=8 * send.numel()), comm.world_size)
    ledger.record(CollectiveRecord("meta", "all_gather", comm.world_size, sent, received))
    return gathered


def exchange_step_meta(comm: Comm, local_present: np.ndarray, local_bad: int, ledger: Ledger) -> StepMeta:
    """all_gather of [bad index: int32][presence bits] (4 + ceil(T/8) bytes per rank)."""
    bits = np.packbits(local_present)
    send = np.empty(4 + bits.size, np.uint8)
    send[:4] = np.array([local_bad], dtype="<i4").view(np.uint8)
    send[4:] = bits
    gathered = _gather_meta(comm, torch.from_numpy(send), ledger).cpu().numpy()
    bad = np.ascontiguousarray(gathered[:, :4]).view("<i4").reshape(-1)
    any_present = np.bitwise_or.reduce(gathered[:, 4:], axis=0)
    present = np.unpackbits(any_present, count=local_present.size).astype(bool)
    return _verdict(present, bad)


def _verdict(present: np.ndarray, bad: np.ndarray) -> StepMeta:
    """The metadata's int32 per rank read: a non-finite gradient first, then a changed one."""
    bad_ranks = np.flatnonzero(bad >= 0)
    if bad_ranks.size:
        return StepMeta(present, int(bad_ranks[0]), int(bad[bad_ranks[0]]))
    changed = np.flatnonzero(bad <= -2)
    if changed.size:
        r = int(changed[0])
        return StepMeta(present, -1, -1, changed_rank=r, changed_index=changed_code(int(bad[r])))
    return StepMeta(present, -1, -1)


def first_nonfinite_on_device(grads: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """A device int32[1]: the index of the first gradient holding a NaN or Inf, or -1; one
    fused max-norm over the list, nothing read back."""
    have = [(i, g) for i, g in enumerate(grads) if g is not None]
    if not have:
        return torch.full((1,), -1, dtype=torch.int32, device=device)
    idx = [i for i, _ in have]
    norms = torch._foreach_norm([g for _, g in have], float("inf"))
    finite = torch.isfinite(torch.stack([n.float() for n in norms]))
    ids = upload(np.asarray(idx, np.int32), device)
    first = torch.where(finite, torch.iinfo(torch.int32).max, ids).min()
    return torch.where(finite.all(), -1, first).to(torch.int32).reshape(1)


def exchange_step_meta_on_device(
    comm: Comm, local_present: np.ndarray, local_bad: torch.Tensor, ledger: Ledger
) -> StepMeta:
    """``exchange_step_meta`` with the bad index a device tensor and the result left on the
    device: the same bytes, and the host never waits for the GPU."""
    dev = local_bad.device
    bits = np.packbits(local_present)
    send = torch.empty(4 + bits.size, dtype=torch.uint8, device=dev)
    send[:4] = local_bad.to(torch.int32).reshape(1).view(torch.uint8)  # little-endian, as "<i4"
    send[4:] = upload(bits, dev)
    gathered = _gather_meta(comm, send, ledger).to(dev)
    bad = gathered[:, :4].contiguous().view(torch.int32).reshape(-1)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=dev)
    bits_by_rank = ((gathered[:, 4:].unsqueeze(-1) >> shifts) & 1).flatten(1)
    present = (bits_by_rank != 0).any(dim=0)[: local_present.size]
    return StepMeta(present, -1, -1, go=(bad == -1).all().reshape(1), bad_by_rank=bad)

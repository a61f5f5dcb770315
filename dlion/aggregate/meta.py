"""Small metadata exchanges that keep every rank's decisions identical.

- ``check_fingerprint``: once, before any bucket collective, all ranks compare the
  parameter list (count, shapes, dtypes) and the optimizer config, so a mismatch is an
  error on every rank instead of mismatched buffer sizes.
- ``exchange_step_meta``: every step, which tensors have a gradient on each rank and
  the first non-finite gradient, so all ranks take the same branch (raise, skip, apply).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dlion import version
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm

FINGERPRINT_FIELDS = ("format+version", "tensors", "elements", "shapes+dtypes", "config")
_FORMAT = 1  # bump when the wire format changes


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def check_fingerprint(
    comm: Comm, params: Sequence[torch.Tensor], config_text: str, ledger: Ledger, *, gradients: int = 0
) -> list[int]:
    """Raise ValueError on every rank if any rank's parameters or config differ. The exchange
    also carries a digest of each rank's first gradients, which may differ (they should):
    returns every rank's."""
    shapes = ";".join(f"{tuple(p.shape)}:{p.dtype}" for p in params)
    # Ranks on another dlion release may round or lay out bits differently: refuse them too.
    release = _crc(f"wire format {_FORMAT}, dlion {version.VERSION}")
    mine = [release, len(params), sum(p.numel() for p in params), _crc(shapes), _crc(config_text), gradients]
    send = torch.tensor(mine, dtype=torch.int64)
    gathered = comm.all_gather(send, "fingerprint all_gather").cpu().tolist()
    sent, received = all_gather_traffic(Traffic(metadata=64 * len(mine)), comm.world_size)
    ledger.record(CollectiveRecord("fingerprint", "all_gather", comm.world_size, sent, received))
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
    """What all ranks agree on before the sign step."""

    present: np.ndarray  # bool[T]: some rank has a gradient for tensor t
    bad_rank: int  # first rank with a non-finite gradient, or -1
    bad_index: int  # that rank's first non-finite tensor, or -1


def exchange_step_meta(comm: Comm, local_present: np.ndarray, local_bad: int, ledger: Ledger) -> StepMeta:
    """all_gather of [bad index: int32][presence bits] (4 + ceil(T/8) bytes per rank)."""
    bits = np.packbits(local_present)
    send = np.empty(4 + bits.size, np.uint8)
    send[:4] = np.array([local_bad], dtype="<i4").view(np.uint8)
    send[4:] = bits
    gathered = comm.all_gather(torch.from_numpy(send), "step metadata all_gather").cpu().numpy()
    sent, received = all_gather_traffic(Traffic(metadata=8 * send.size), comm.world_size)
    ledger.record(CollectiveRecord("meta", "all_gather", comm.world_size, sent, received))
    bad = np.ascontiguousarray(gathered[:, :4]).view("<i4").reshape(-1)
    any_present = np.bitwise_or.reduce(gathered[:, 4:], axis=0)
    present = np.unpackbits(any_present, count=local_present.size).astype(bool)
    bad_ranks = np.flatnonzero(bad >= 0)
    if bad_ranks.size:
        return StepMeta(present, int(bad_ranks[0]), int(bad[bad_ranks[0]]))
    return StepMeta(present, -1, -1)

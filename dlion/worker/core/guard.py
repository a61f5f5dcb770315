"""The guard for a silent loss of the saving: gradients that reach a dlion optimizer already
averaged, as DistributedDataParallel leaves them when no dlion hook replaced its all-reduce.

Averaged gradients are the same on every rank. The first step's fingerprint exchange carries a
digest of each rank's gradients (no extra message); every rank sees every digest, so all of
them warn, or none.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence

import torch

SAMPLE = 4096  # elements of each gradient that enter the digest


class AveragedGradientsWarning(UserWarning):
    """Every rank had the same gradients: they were averaged before the optimizer's exchange."""


def gradient_digest(grads: Sequence[torch.Tensor | None]) -> int:
    """A CRC of the first SAMPLE elements of every gradient: equal on every rank only if the
    gradients are. 0 (nothing to compare) when there is none, or all are zero: DCP's setup
    step (torch.distributed.checkpoint.state_dict) feeds every rank zero gradients."""
    crc, seen = 0, False
    for g in grads:
        if g is not None:
            head = g.detach().reshape(-1)[:SAMPLE].cpu().contiguous()
            seen = seen or bool(head.any())
            crc = zlib.crc32(head.view(torch.uint8).numpy().tobytes(), crc)
    return crc + 1 if seen else 0


def warn_if_averaged(digests: Sequence[int], owner: str, n_params: int) -> bool:
    """Warn when every rank's gradient digest is the same; whether it warned."""
    n = len(digests)
    if n < 2 or digests[0] == 0 or len(set(digests)) != 1:
        return False
    per_param = 2 * (n - 1) / n * 4  # bytes a rank sends in a ring all-reduce of fp32
    warnings.warn(
        f"dlion: all {n} ranks had the same gradients at the first step, so they reached {owner} "
        "already averaged, most likely by DistributedDataParallel's all-reduce. That all-reduce sends "
        f"about {per_param:.1f} bytes per parameter per step ({per_param * n_params / 1e6:.2f} MB for "
        f"these {n_params:,} parameters) on top of {owner}'s own exchange. With DistributedLion, call "
        "dlion.attach(ddp_model, optimizer): DDP then sends nothing and the vote sees each rank's own "
        "gradients.",
        AveragedGradientsWarning,
        stacklevel=4,
    )
    return True

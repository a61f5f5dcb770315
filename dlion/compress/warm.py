"""Have every Numba CPU kernel ready before the first step: compiled on a machine's first run
(about half a minute on 2 cores), loaded from Numba's cache after. Run on tiny inputs of the
types and layouts the optimizers pass, so no step pays for a compile and no step time counts
one."""

from __future__ import annotations

import itertools
import time

import numpy as np
import torch

from dlion.compress import terngrad as tern
from dlion.compress.sign_ops import CpuSignOps


def warm_up() -> float:
    """Run each CPU kernel once; the seconds it took."""
    t0 = time.perf_counter()
    ops = CpuSignOps()
    grad, m = torch.zeros(100), torch.zeros(100)
    send = torch.zeros(16, dtype=torch.uint8)
    ops.sign_step(grad, m, send, 0.9, 0.99, 2**63 + 1)
    for dtype in (torch.float32, torch.float64):
        ops.nonfinite(torch.zeros(4, dtype=dtype))
    # Even N: ties. 16 bytes: whole 64-bit words; 13: words (strided) and a tail.
    for n, nbytes in itertools.product((2, 3), (13, 16)):
        packed = torch.zeros((n, nbytes), dtype=torch.uint8)
        for vote, tie in (("majority", "random"), ("majority", "zero"), ("average", "random")):
            planes, table = ops.combine(packed, vote=vote, tie=tie, tie_key=2**63 + 1, start=0)
            for cautious in (False, True):  # a slot's planes are a strided slice of the bucket's
                ops.apply(torch.zeros(40), planes[:, 2:7], table, 1e-3, 0.1, cautious)
    layout = tern.plan_layout([0], [100])
    for world in (1, 2):
        packet = tern.encode(layout, [np.ones(100, np.float32)], [1.0], [2**63 + 1])
        sums = tern.sum_codes(np.stack([packet] * world))
        tern.unpack_sums(tern.pack_sums(sums, world, layout.sums_bytes()), world, layout.n_slots)
    return time.perf_counter() - t0

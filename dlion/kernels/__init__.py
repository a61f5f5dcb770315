"""Sign kernels: Numba CPU versions (default names) and their NumPy references (``*_ref``).

The CUDA twins (``cuda_ops``) and the TernGrad kernels (``ternary``) are imported by name
where they are used, so ``import dlion`` never loads numba.cuda.
"""

from dlion.kernels.cpu import (
    all_finite,
    apply_update,
    coin_bytes,
    lion_sign_step,
    pack_signs,
    unpack_signs,
)
from dlion.kernels.cpu_vote import count_planes, majority_vote
from dlion.kernels.reference import (
    all_finite_ref,
    apply_update_ref,
    coin_bytes_ref,
    count_planes_ref,
    lion_sign_step_ref,
    majority_vote_ref,
    pack_signs_ref,
    unpack_signs_ref,
)

__all__ = [
    "all_finite",
    "all_finite_ref",
    "apply_update",
    "apply_update_ref",
    "coin_bytes",
    "coin_bytes_ref",
    "count_planes",
    "count_planes_ref",
    "lion_sign_step",
    "lion_sign_step_ref",
    "majority_vote",
    "majority_vote_ref",
    "pack_signs",
    "pack_signs_ref",
    "unpack_signs",
    "unpack_signs_ref",
]

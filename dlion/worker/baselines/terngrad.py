"""TernGrad (Wen et al., NeurIPS 2017): ternary gradients, averaged, fed to SGD with momentum."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from dlion.aggregate.backends import CODES, backend_spec
from dlion.aggregate.codes import exchange_codes, share_scalers
from dlion.aggregate.meta import StepMeta
from dlion.checks import check_number
from dlion.compress import terngrad as codec
from dlion.transport import Comm
from dlion.worker.core.base import Grads
from dlion.worker.core.config import CommConfig, check_lion_hyperparameters, config_of
from dlion.worker.core.inner import InnerStep

TernBackend = Literal["allgather", "server"]


@dataclass(frozen=True, kw_only=True)
class TernGradConfig(CommConfig):
    """How TernGrad communicates; lr, momentum and weight decay live in the inner optimizer.

    backend:     "allgather": every rank gathers every rank's codes and sums them, (N-1) x 2
                 bits per parameter each way. "server": a parameter server co-located on
                 rank 0 gathers the codes (2 bits up per worker), sums them and broadcasts
                 the sums in ceil(log2(2N+1)) bits per parameter.
    clip_factor: c of the per-layer clipping at c * sigma (the paper's 2.5); None for the
                 plain scaler max|g|, under which the ternary gradient is unbiased.
    transport, nonfinite, seed, timeout: as in CommConfig; rank r's draws for tensor t at
                 step k use derive_key(seed, TERN_STREAM, k, r, t).
    """

    backend: TernBackend = "allgather"
    clip_factor: float | None = codec.CLIP_FACTOR

    def __post_init__(self) -> None:
        backend_spec(self.backend, CODES)
        # Two checks, two messages: a scale at or below 0, or one that is no scale at all (inf).
        check_number("clip_factor", self.clip_factor, low=0, low_open=True, finite=False, or_none=True)
        check_number("clip_factor", self.clip_factor, or_none=True, expected="finite")
        super().__post_init__()


@dataclass
class TernStep:
    host: list[np.ndarray | None]  # each gradient as float32[numel] on the host
    scales: np.ndarray  # float32[T], the max over ranks
    layout: codec.CodeLayout
    n_buckets: int = 1  # the one packet of codes


class TernGrad(InnerStep[TernStep]):
    """TernGrad around an inner torch optimizer (the paper trains with SGD with momentum).

    Per step, with N ranks and T parameter tensors ("layers"):
      1. Check and agree (dlion.worker.core.base): on the first step a fingerprint all_gather (6
         int64 per rank); every step the metadata all_gather (4 + ceil(T/8) bytes per rank)
         of which tensors have a gradient and the first non-finite one; every rank then
         raises, skips the step, or goes on. A tensor no rank has a gradient for stays None
         (the inner optimizer skips it); a rank without one for a tensor others have sends
         zeros.
      2. Local scalers: per tensor, max|g| or, with clipping, min(max|g|, c * sigma); then
         scaler sharing: an all_gather of the T fp32 scalers (ledger kind "scalers"); every
         rank takes the max over ranks, so all codes count in units of the same s.
      3. Encode: ternarize and pack (fused kernel per tensor): t = sign(g) * Bernoulli(|g|/s)
         with this rank's own key, 2 bits per element into one flat packet.
      4-5. Exchange and sum (dlion.aggregate.codes), by ``backend``: "allgather" gathers every
         rank's packet and each rank sums the codes; "server" gathers the packets on rank 0,
         which sums them and broadcasts the sums in ceil(log2(2N + 1)) bit planes.
      6. Apply: the mean s * sum / N becomes each ``p.grad``, identical on all ranks, and the
         inner optimizer steps.

    It is a torch.optim.Optimizer sharing the inner one's param groups and state. With one
    rank (or no process group) nothing is sent, but the gradient is still ternarized, so a
    single worker trains with TernGrad's noise. ``ledger`` records every collective's bits
    (payload, padding, metadata, scalers) per step.
    """

    STATE_KEY = "terngrad"

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        process_group: Any = None,
        *,
        config: TernGradConfig | None = None,
    ) -> None:
        config = config if config is not None else TernGradConfig()
        super().__init__(inner, config=config, process_group=process_group)
        self.config: TernGradConfig = config

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> TernStep:
        # float32[numel] on the host (a view when the gradient already is one).
        host = [None if g is None else g.detach().reshape(-1).to("cpu", torch.float32).numpy() for g in grads]
        clip = self.config.clip_factor
        # A tensor without a local gradient counts as zeros (scaler 0).
        local = np.array([0.0 if g is None else codec.local_scaler(g, clip) for g in host], dtype=np.float32)
        scales = share_scalers(comm, local, self.ledger) if comm is not None else local
        live = [int(i) for i in np.flatnonzero(meta.present)]
        layout = codec.plan_layout(live, [self._flat[i][0].numel() for i in live])
        return TernStep(host, scales, layout)

    def _encode(self, work: TernStep, k: int) -> np.ndarray:
        live = work.layout.indices
        keys = [codec.draw_key(self.config.seed, self.steps_taken, self.rank, i) for i in live]
        return codec.encode(work.layout, [work.host[i] for i in live], work.scales[list(live)], keys)

    def _exchange(self, comm: Comm | None, work: TernStep, k: int, packet: np.ndarray) -> np.ndarray:
        if comm is None:
            return codec.sum_codes(packet[None, :])
        return exchange_codes(comm, packet, work.layout, self.config.backend, self.ledger)

    def _apply(self, work: TernStep, k: int, sums: np.ndarray) -> None:
        for j, i in enumerate(work.layout.indices):
            mean = codec.decode_mean(sums[work.layout.slots(j)], work.scales[i], self.world_size)
            self._set_grad(i, torch.from_numpy(mean))


def build_terngrad(
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    process_group: Any = None,
    config: TernGradConfig | None = None,
    **options: Any,
) -> TernGrad:
    """TernGrad over torch.optim.SGD(lr, momentum=betas[0], weight_decay), as in the paper;
    ``config`` (TernGradConfig) whole, or its fields as keywords, not both.

    betas[1] is validated like every optimizer's betas and otherwise unused: SGD with
    momentum has one coefficient. Weight decay is applied by SGD to the averaged ternary
    gradient (exact and identical on every rank), where the reference implementation puts
    L2 in the loss and so ternarizes it with the data gradient.
    """
    check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
    config = config_of(TernGradConfig, config, options, owner="build_terngrad")
    inner = torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
    return TernGrad(inner, process_group, config=config)

"""Deep Gradient Compression (Lin et al., ICLR 2018): momentum SGD that sends top-k entries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from dlion.aggregate.backends import SPARSE, backend_spec
from dlion.aggregate.meta import StepMeta
from dlion.aggregate.sparse import exchange_sparse
from dlion.checks import check_number
from dlion.compress import dgc as codec
from dlion.transport import Comm
from dlion.wire import SAMPLE_STREAM, derive_key
from dlion.worker.baselines.dgc_config import DGCConfig
from dlion.worker.baselines.dgc_update import clip_factor, momentum_correction, momentum_sgd_apply, take_sent
from dlion.worker.core.base import CommOptimizer, Grads
from dlion.worker.core.config import config_of

__all__ = [
    "DGC",
    "DGCConfig",
    "build_dgc",
    "clip_factor",
    "momentum_correction",
    "momentum_sgd_apply",
    "take_sent",
]


@dataclass
class DGCStep:
    grads: Grads
    live: list[int]
    scale: float  # local clipping factor
    density: float
    layout: codec.WireLayout
    n_buckets: int  # 1 (the message), or 0 when no tensor has a gradient anywhere


class DGC(CommOptimizer[DGCStep]):
    """Deep Gradient Compression: momentum SGD where each rank sends the top 0.1% of its
    accumulated velocity and keeps the rest as residual.

    Per step t, with N ranks (N = 1 runs the same math and skips every collective):

      1. Check and agree (dlion.worker.core.base): on the first step a fingerprint all_gather
         (6 int64 per rank); then the metadata all_gather (4 + ceil(T/8) bytes per rank) of
         which tensors have a gradient somewhere and the first non-finite one. Every rank
         then raises NonFiniteGradientError, skips the step (nonfinite="skip"), or goes on.
         A tensor no rank has a gradient for is left alone; a rank without one sends g = 0.
      2. Local gradient clipping to clip_norm / sqrt(N) (off by default).
      3. Encode (one bucket: the message): compress each tensor of 2+ dimensions:
         momentum correction u <- m u + g, v <- v + u; sampled top-k selection of
         k = ceil(numel * density_t) entries of v; the sent entries leave v (and u, by
         momentum factor masking). Dense tensors send g.
      4. Exchange (dlion.aggregate.sparse) one fixed-length message per rank (int32
         indices, fp32|fp16 values; see dlion.compress.dgc). "allgather": all_gather of
         every message, (N-1) messages each way; the dense tensors' fp32 gradients take an
         all-reduce in rank order (ordered_all_reduce_mean, ring all_reduce's cost).
         "server": the dense gradients ride in the message; gather to rank 0, which decodes
         and broadcasts the dense fp32 average of every tensor: one message up, 32 bits per
         parameter down.
      5. Combine: decode, adding every rank's entries in rank order, and divide by N: the
         average update, bit-identical on every rank, across backends, and to a
         single-process reference.
      6. Apply: momentum SGD (momentum_sgd_apply) with each param group's lr and weight decay.
    """

    STATE_KEY = "dgc"
    PER_RANK_STATE = True  # each rank's residuals and momentum are its own

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        weight_decay: float = 0.0,
        process_group: Any = None,
        *,
        config: DGCConfig | None = None,
    ) -> None:
        check_number("lr", lr, low=0)
        check_number("weight_decay", weight_decay, low=0)
        config = config if config is not None else DGCConfig()
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay}, config=config, process_group=process_group
        )
        self.config: DGCConfig = config
        self._params_changed()

    def _params_changed(self) -> None:
        """Which tensors are compressed, and the wire layouts, for the parameter list of now."""
        self._layouts: dict[tuple[tuple[int, ...], float], codec.WireLayout] = {}
        self._compressed = [codec.is_compressed(p.shape, self.config.min_numel) for p, _ in self._flat]

    def density(self) -> float:
        """Fraction of each compressed tensor sent at the coming step."""
        c = self.config
        return codec.density_at(
            self.steps_taken, sparsity=c.sparsity, warmup_steps=c.warmup_steps, warmup_stages=c.warmup_stages
        )

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> DGCStep:
        live = [int(t) for t, on in enumerate(meta.present) if on]
        scale = clip_factor([g for g in grads if g is not None], self.config.clip_norm, self.world_size)
        density = self.density()
        return DGCStep(grads, live, scale, density, self._layout(live, density), 1 if live else 0)

    def _encode(self, work: DGCStep, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(message, dense gradients travelling apart: fp32[D], empty when in the message)."""
        cfg, layout = self.config, work.layout
        indices, values, dense = [], [], []
        for t in work.live:
            p, _ = self._flat[t]
            g = work.grads[t]
            flat = torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
            if work.scale != 1.0:
                flat = flat * work.scale
            if not self._compressed[t]:
                dense.append(flat.cpu())
                continue
            u = self._fp32_state(p, "momentum").view(-1)
            v = self._fp32_state(p, "velocity").view(-1)
            momentum_correction(u, v, flat, cfg.momentum)
            plan = codec.sample_plan(p.numel(), work.density, cfg.sample_ratio)
            key = derive_key(cfg.seed, SAMPLE_STREAM, self.steps_taken, self.rank, t)
            idx = codec.select_topk(v, plan, key)
            values.append(take_sent(u, v, idx, cfg.momentum_masking).cpu())
            indices.append(idx.cpu())
        if layout.dense_in_message:
            return codec.encode(layout, indices, values, dense), torch.empty(0)
        apart = torch.cat(dense) if dense else torch.empty(0)
        return codec.encode(layout, indices, values, []), apart

    def _exchange(
        self, comm: Comm | None, work: DGCStep, k: int, packet: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        msg, dense = packet
        if comm is not None:
            return exchange_sparse(comm, msg, dense, work.layout, self.config.backend, self.ledger)
        avg = codec.decode_sum(work.layout, msg[None])  # a world of one: its own message
        return avg if work.layout.dense_in_message else codec.place_dense(work.layout, avg, dense)

    def _apply(self, work: DGCStep, k: int, avg: torch.Tensor) -> None:
        layout = work.layout
        for t, base, numel, kept in zip(work.live, layout.bases, layout.numels, layout.ks, strict=True):
            p, group = self._flat[t]
            momentum_sgd_apply(
                p,
                avg[base : base + numel].view_as(p).to(p.device),
                self._fp32_state(p, "momentum_buffer"),
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=self.config.momentum,
                corrected=kept is not None,
            )

    def _layout(self, live: list[int], density: float) -> codec.WireLayout:
        key = (tuple(live), density)
        if key not in self._layouts:
            ratio = self.config.sample_ratio
            numels = [self._flat[t][0].numel() for t in live]
            ks = [
                codec.sample_plan(n, density, ratio).k if self._compressed[t] else None
                for t, n in zip(live, numels, strict=True)
            ]
            self._layouts[key] = codec.plan_wire(
                numels,
                ks,
                codec.VALUE_DTYPES[self.config.value_dtype],
                dense_in_message=backend_spec(self.config.backend, SPARSE).server,
            )
        return self._layouts[key]


def build_dgc(
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    process_group: Any = None,
    **options: Any,
) -> DGC:
    """DGC with betas[0] as the SGD momentum (betas[1] is unused) and the other DGCConfig
    fields as keywords (their defaults where not given); weight decay is L2 added to the
    gradient locally, as torch.optim.SGD's."""
    config = config_of(DGCConfig, None, options, owner="build_dgc", momentum=betas[0])
    return DGC(params, lr=lr, weight_decay=weight_decay, process_group=process_group, config=config)

"""Deep Gradient Compression (Lin et al., ICLR 2018): momentum SGD that sends top-k entries."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dlion.aggregate.ordered import ordered_all_reduce_mean, ring_all_gather
from dlion.compress import dgc as codec
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.transport import make_comm
from dlion.wire import SAMPLE_STREAM, derive_key
from dlion.worker.agreement import (
    CommRanks,
    agree_on_step,
    config_text,
    counters_state,
    first_nonfinite,
    params_with_groups,
    raise_nonfinite,
    restore_counters,
)
from dlion.worker.dgc_config import DGCConfig, check_value, is_number
from dlion.worker.dgc_update import clip_factor, momentum_correction, momentum_sgd_apply, take_sent
from dlion.worker.lion import run_closure

__all__ = [
    "DGC",
    "DGCConfig",
    "build_dgc",
    "clip_factor",
    "momentum_correction",
    "momentum_sgd_apply",
    "take_sent",
]


class DGC(CommRanks, torch.optim.Optimizer):
    """Deep Gradient Compression: momentum SGD where each rank sends the top 0.1% of its
    accumulated velocity and keeps the rest as residual.

    Per step t, with N ranks (N = 1 runs the same math and skips every collective):

      1. Agree: on the first step a fingerprint all_gather (5 int64 per rank); then the
         metadata all_gather (4 + ceil(T/8) bytes per rank) of which tensors have a
         gradient somewhere and the first non-finite one. Every rank then raises
         NonFiniteGradientError, skips the step (nonfinite="skip"), or goes on. A tensor
         no rank has a gradient for is left alone; a rank without one sends g = 0.
      2. Local gradient clipping to clip_norm / sqrt(N) (off by default).
      3. Compress each tensor of 2+ dimensions: momentum correction u <- m u + g,
         v <- v + u; sampled top-k selection of k = ceil(numel * density_t) entries of v;
         the sent entries leave v (and u, by momentum factor masking). Dense tensors send g.
      4. Exchange one fixed-length message per rank (int32 indices, fp32|fp16 values; see
         dlion.compress.dgc). "allgather": all_gather of every message, (N-1) messages
         each way; the dense tensors' fp32 gradients take an all-reduce in rank order
         (ordered_all_reduce_mean, ring all_reduce's cost). "server": the dense gradients
         ride in the message; gather to rank 0, which decodes and broadcasts the dense fp32
         average of every tensor: one message up, 32 bits per parameter down.
      5. Decode: add every rank's entries in rank order, divide by N: the average update,
         bit-identical on every rank, across backends, and to a single-process reference.
      6. Apply momentum SGD (momentum_sgd_apply) with each param group's lr and weight decay.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        weight_decay: float = 0.0,
        process_group: Any = None,
        *,
        config: DGCConfig | None = None,
    ) -> None:
        check_value("lr", lr, is_number(lr) and lr >= 0, "a number >= 0")
        check_value(
            "weight_decay", weight_decay, is_number(weight_decay) and weight_decay >= 0, "a number >= 0"
        )
        self.config = config if config is not None else DGCConfig()
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._flat = params_with_groups(self.param_groups)
        for p, _ in self._flat:
            if not p.is_floating_point():
                raise TypeError(f"DGC needs floating-point parameters, got {p.dtype} {tuple(p.shape)}")
        self._compressed = [codec.is_compressed(p.shape, self.config.min_numel) for p, _ in self._flat]
        self._comm = make_comm(process_group, self.config.timeout, self.config.transport)
        self.ledger = Ledger(n_params=sum(p.numel() for p, _ in self._flat))
        self.steps_taken = 0  # skipped steps included: keys the samples and the warm-up
        self.skipped_steps = 0
        self._checked = False
        self._layouts: dict[tuple[tuple[int, ...], float], codec.WireLayout] = {}

    def density(self) -> float:
        """Fraction of each compressed tensor sent at the coming step."""
        c = self.config
        return codec.density_at(
            self.steps_taken, sparsity=c.sparsity, warmup_steps=c.warmup_steps, warmup_stages=c.warmup_stages
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        grads = [self._checked_grad(p) for p, _ in self._flat]
        comm = self._comm if self.world_size > 1 else None
        if comm is not None:
            self.ledger.begin_step()
        try:
            self._step(comm, grads)
        finally:
            if comm is not None:
                self.ledger.end_step()
        self.steps_taken += 1
        return loss

    def _step(self, comm: Any, grads: list[torch.Tensor | None]) -> None:
        cfg = self.config
        # Phase 1: agree on the live tensors and on what a non-finite gradient does.
        present = np.array([g is not None for g in grads], dtype=bool)
        bad = first_nonfinite(grads)
        meta = agree_on_step(
            comm, check=not self._checked, params=[p for p, _ in self._flat], text=self._config_text(),
            present=present, bad=bad, ledger=self.ledger,
        )  # fmt: skip
        self._checked = comm is not None
        if meta.bad_rank >= 0:
            where = f"rank {meta.bad_rank}, parameter #{meta.bad_index}"
            raise_nonfinite(cfg.nonfinite, where=where, step=self.steps_taken)
            self.skipped_steps += 1
            return
        live = [int(t) for t in np.flatnonzero(meta.present)]
        if not live:
            return
        # Phase 2: local gradient clipping.
        scale = clip_factor([g for g in grads if g is not None], cfg.clip_norm, self.world_size)
        # Phase 3: momentum correction, selection, residual; one message.
        density = self.density()
        layout = self._layout(live, density)
        msg, dense = self._encode(live, grads, scale, density, layout)
        # Phases 4-5: exchange and decode to the average update.
        avg = self._exchange(comm, msg, dense, layout)
        # Phase 6: momentum SGD, the same on every rank.
        for t, base, numel, k in zip(live, layout.bases, layout.numels, layout.ks, strict=True):
            p, group = self._flat[t]
            momentum_sgd_apply(
                p,
                avg[base : base + numel].view_as(p).to(p.device),
                self._buffer(p, "momentum_buffer"),
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=cfg.momentum,
                corrected=k is not None,
            )

    def _encode(
        self,
        live: list[int],
        grads: list[torch.Tensor | None],
        scale: float,
        density: float,
        layout: codec.WireLayout,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(message, dense gradients travelling apart: fp32[D], empty when in the message)."""
        cfg = self.config
        indices, values, dense = [], [], []
        for t in live:
            p, _ = self._flat[t]
            g = grads[t]
            flat = torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
            if scale != 1.0:
                flat = flat * scale
            if not self._compressed[t]:
                dense.append(flat.cpu())
                continue
            u = self._buffer(p, "momentum").view(-1)
            v = self._buffer(p, "velocity").view(-1)
            momentum_correction(u, v, flat, cfg.momentum)
            plan = codec.sample_plan(p.numel(), density, cfg.sample_ratio)
            key = derive_key(cfg.seed, SAMPLE_STREAM, self.steps_taken, self.rank, t)
            idx = codec.select_topk(v, plan, key)
            values.append(take_sent(u, v, idx, cfg.momentum_masking).cpu())
            indices.append(idx.cpu())
        if layout.dense_in_message:
            return codec.encode(layout, indices, values, dense), torch.empty(0)
        apart = torch.cat(dense) if dense else torch.empty(0)
        return codec.encode(layout, indices, values, []), apart

    def _exchange(
        self, comm: Any, msg: torch.Tensor, dense: torch.Tensor, layout: codec.WireLayout
    ) -> torch.Tensor:
        """The average update of every live tensor, fp32[total numel]."""
        if comm is not None and self.config.backend == "server":
            return self._server_exchange(comm, msg, layout)
        if comm is None:
            avg = codec.decode_sum(layout, msg[None])
        else:
            n = comm.world_size
            gathered = comm.all_gather(msg, "dgc all_gather").cpu()
            chunks = [codec.message_traffic(layout, c) for c in codec.valid_slots(layout, gathered)]
            sent, received = ring_all_gather(chunks, comm.rank)
            self.ledger.record(CollectiveRecord("dgc", "all_gather", n, sent, received))
            avg = codec.decode_sum(layout, gathered).div_(n)
            if dense.numel():
                dense = ordered_all_reduce_mean(comm, dense, self.ledger)
        for off, base, numel in layout.dense_ranges():
            avg[base : base + numel] = dense[off : off + numel]
        return avg

    def _server_exchange(self, comm: Any, msg: torch.Tensor, layout: codec.WireLayout) -> torch.Tensor:
        """Parameter server co-located on rank 0: its own message does not cross the wire."""
        n, me = comm.world_size, comm.rank
        total = layout.total_numel
        padded = -(-total // 4) * 4  # whole 16-byte words of fp32
        gathered = comm.gather(msg, 0, "dgc gather to server")
        avg = torch.zeros(padded, dtype=torch.float32)
        if me == 0:
            assert gathered is not None
            gathered = gathered.cpu()
            avg[:total] = codec.decode_sum(layout, gathered).div_(n)
            up = [codec.message_traffic(layout, c) for c in codec.valid_slots(layout, gathered)[1:]]
            self.ledger.record(CollectiveRecord("dgc[server]", "gather", n, Traffic(), sum(up, Traffic())))
        else:
            mine = codec.message_traffic(layout, codec.valid_slots(layout, msg[None])[0])
            self.ledger.record(CollectiveRecord("dgc", "gather", n, mine, Traffic()))
        avg = comm.broadcast(avg, 0, "dgc broadcast from server").cpu()
        down = Traffic(payload=32 * total, padding=32 * (padded - total))
        if me == 0:
            self.ledger.record(CollectiveRecord("dgc[server]", "broadcast", n, down * (n - 1), Traffic()))
        else:
            self.ledger.record(CollectiveRecord("dgc", "broadcast", n, Traffic(), down))
        return avg[:total]

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
                dense_in_message=self.config.backend == "server",
            )
        return self._layouts[key]

    def _buffer(self, p: torch.Tensor, name: str) -> torch.Tensor:
        state = self.state[p]
        buf = state.get(name)
        if buf is None:
            buf = state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        elif buf.dtype != torch.float32 or not buf.is_contiguous():
            # torch's load_state_dict casts state to the parameter dtype; DGC's stays fp32.
            buf = state[name] = buf.to(torch.float32).contiguous()
        return buf

    @staticmethod
    def _checked_grad(p: torch.Tensor) -> torch.Tensor | None:
        g = p.grad
        if g is not None and (g.is_sparse or not g.is_floating_point()):
            raise TypeError(f"DGC needs dense floating-point gradients; got {g.layout} {g.dtype}")
        return g

    def _config_text(self) -> str:
        return config_text(self.config)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dgc"] = counters_state(self)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(restore_counters(self, state_dict, "dgc"))
        self._flat = params_with_groups(self.param_groups)


def build_dgc(
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    process_group: dist.ProcessGroup | None = None,
    seed: int = 0,
    backend: str = "allgather",
    transport: str = "torch",
    timeout: timedelta | None = None,
) -> DGC:
    """DGC for the registry: betas[0] is the SGD momentum (betas[1] is unused); weight decay
    is L2 added to the gradient locally, as torch.optim.SGD's; the rest are DGCConfig defaults."""
    config = DGCConfig(
        momentum=betas[0],
        seed=seed,
        backend=backend,  # type: ignore[arg-type]
        transport=transport,  # type: ignore[arg-type]
        timeout=timeout,
    )
    return DGC(params, lr=lr, weight_decay=weight_decay, process_group=process_group, config=config)

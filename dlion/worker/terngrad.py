"""TernGrad (Wen et al., NeurIPS 2017): ternary gradients, averaged, fed to SGD with momentum."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from dlion.compress import terngrad as codec
from dlion.kernels import all_finite
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import TorchComm, make_comm
from dlion.worker.agreement import (
    CommRanks,
    agree_on_step,
    config_text,
    counters_state,
    raise_nonfinite,
    restore_counters,
)
from dlion.worker.config import NONFINITE, TRANSPORTS, check_lion_hyperparameters
from dlion.worker.lion import run_closure

TernBackend = Literal["allgather", "server"]
TERN_BACKENDS: tuple[str, ...] = ("allgather", "server")
SERVER_RANK = 0


@dataclass(frozen=True, kw_only=True)
class TernGradConfig:
    """How TernGrad communicates; lr, momentum and weight decay live in the inner optimizer.

    backend:     "allgather": every rank gathers every rank's codes and sums them, (N-1) x 2
                 bits per parameter each way. "server": a parameter server co-located on
                 rank 0 gathers the codes (2 bits up per worker), sums them and broadcasts
                 the sums in ceil(log2(2N+1)) bits per parameter.
    transport:   "torch" (torch.distributed) or "mpi" (mpi4py, COMM_WORLD).
    clip_factor: c of the per-layer clipping at c * sigma (the paper's 2.5); None for the
                 plain scaler max|g|, under which the ternary gradient is unbiased.
    nonfinite:   a NaN/Inf gradient on any rank: "raise" on every rank, or "skip" the step.
    seed:        run seed; rank r's draws for tensor t at step k use
                 derive_key(seed, TERN_STREAM, k, r, t). Must match across ranks.
    timeout:     bound on every collective wait (None: the process group's timeout).
    """

    backend: TernBackend = "allgather"
    transport: Literal["torch", "mpi"] = "torch"
    clip_factor: float | None = codec.CLIP_FACTOR
    nonfinite: Literal["raise", "skip"] = "raise"
    seed: int = 0
    timeout: timedelta | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backend", TERN_BACKENDS),
            ("transport", TRANSPORTS),
            ("nonfinite", NONFINITE),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        c = self.clip_factor
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
            raise ValueError(f"clip_factor must be a number > 0 or None, got {c!r}")
        if c is not None and not math.isfinite(c):
            raise ValueError(f"clip_factor must be finite, got {c!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.timeout is not None and self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


class TernGrad(CommRanks):
    """TernGrad around an inner torch optimizer (the paper trains with SGD with momentum).

    Per step, with N ranks and T parameter tensors ("layers"):
      1. Agreement. First step only: a fingerprint all_gather (5 int64 per rank) checks
         that all ranks hold the same parameters and config. Every step: the metadata
         all_gather (4 + ceil(T/8) bytes per rank) of which tensors have a gradient and
         the first non-finite one; every rank then raises, skips the step, or goes on.
         A tensor no rank has a gradient for stays None (the inner optimizer skips it);
         a rank without one for a tensor others have sends zeros.
      2. Local scalers: per tensor, max|g| or, with clipping, min(max|g|, c * sigma).
      3. Scaler sharing: all_gather of the T fp32 scalers (ledger kind "scalers"); every
         rank takes the max over ranks, so all codes count in units of the same s.
      4. Ternarize and pack (fused kernel per tensor): t = sign(g) * Bernoulli(|g| / s)
         with this rank's own key, 2 bits per element into one flat packet.
      5. Exchange and sum, by ``backend``: "allgather" gathers every rank's packet and each
         rank sums the codes; "server" gathers the packets on rank 0, which sums them and
         broadcasts the sums in ceil(log2(2N + 1)) bit planes.
      6. Decode the mean s * sum / N into each ``p.grad``, identical on all ranks, and run
         the inner optimizer's step.

    With one rank (or no process group) steps 1, 3 and 5 send nothing, but the gradient is
    still ternarized, so a single worker trains with TernGrad's noise. ``ledger`` records
    every collective's bits (payload, padding, metadata, scalers) per step.
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        process_group: dist.ProcessGroup | None = None,
        *,
        config: TernGradConfig | None = None,
    ) -> None:
        self.inner = inner
        self.config = config if config is not None else TernGradConfig()
        self._comm: TorchComm | None = make_comm(process_group, self.config.timeout, self.config.transport)
        self._flat: list[torch.Tensor] = [p for g in inner.param_groups for p in g["params"]]
        self.ledger = Ledger(n_params=sum(p.numel() for p in self._flat))
        self.steps_taken = 0  # steps that ran, skipped ones included: keys the draws
        self.skipped_steps = 0
        self._checked = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = run_closure(closure)
        comm = self._comm if self._comm is not None and self._comm.world_size > 1 else None
        grads = [self._host_grad(i, p) for i, p in enumerate(self._flat)]
        if comm is not None:
            self.ledger.begin_step()
        try:
            live = self._agree(comm, grads)  # phase 1
            if live is not None:
                scales = self._share_scalers(comm, self._local_scalers(grads))  # phases 2-3
                layout = codec.plan_layout(live, [self._flat[i].numel() for i in live])
                keys = [codec.draw_key(self.config.seed, self.steps_taken, self.rank, i) for i in live]
                packet = codec.encode(layout, [grads[i] for i in live], scales[live], keys)  # phase 4
                sums = self._exchange(comm, packet, layout)  # phase 5
                self._set_mean_grads(layout, sums, scales)  # phase 6
        finally:
            if comm is not None:
                self.ledger.end_step()
        self.steps_taken += 1
        if live is not None:
            self.inner.step()
        return loss

    def _host_grad(self, i: int, p: torch.Tensor) -> np.ndarray | None:
        """float32[numel] on the host (a view when the gradient already is one), or None."""
        g = p.grad
        if g is None:
            return None
        if g.is_sparse or not g.is_floating_point():
            raise TypeError(f"TernGrad needs dense floating-point gradients; parameter #{i} has {g.dtype}")
        return g.detach().reshape(-1).to("cpu", torch.float32).numpy()

    def _agree(self, comm: TorchComm | None, grads: list[np.ndarray | None]) -> list[int] | None:
        """Indices of the tensors to update, the same on every rank; None to skip the step."""
        present = np.array([g is not None for g in grads], dtype=bool)
        bad = next((i for i, g in enumerate(grads) if g is not None and not all_finite(g)), -1)
        meta = agree_on_step(
            comm, check=not self._checked, params=self._flat, text=self._config_text(),
            present=present, bad=bad, ledger=self.ledger,
        )  # fmt: skip
        self._checked = comm is not None
        if meta.bad_rank >= 0:
            where = f"rank {meta.bad_rank}, parameter #{meta.bad_index}"
            raise_nonfinite(self.config.nonfinite, where=where, step=self.steps_taken)
            self.skipped_steps += 1
            return None
        return [int(i) for i in np.flatnonzero(meta.present)]

    def _local_scalers(self, grads: list[np.ndarray | None]) -> np.ndarray:
        """float32[T]; a tensor without a local gradient counts as zeros (scaler 0)."""
        clip = self.config.clip_factor
        return np.array([0.0 if g is None else codec.local_scaler(g, clip) for g in grads], dtype=np.float32)

    def _share_scalers(self, comm: TorchComm | None, local: np.ndarray) -> np.ndarray:
        if comm is None:
            return local
        t = local.size
        send = np.zeros(max(4, -(-t // 4) * 4), np.float32)  # whole 16-byte words
        send[:t] = local
        gathered = comm.all_gather(torch.from_numpy(send), "scaler all_gather").cpu().numpy()
        sent, received = all_gather_traffic(
            Traffic(scalers=32 * t, padding=32 * (send.size - t)), comm.world_size
        )
        self.ledger.record(CollectiveRecord("scalers", "all_gather", comm.world_size, sent, received))
        return codec.shared_scalers(gathered[:, :t])

    def _exchange(self, comm: TorchComm | None, packet: np.ndarray, layout: codec.CodeLayout) -> np.ndarray:
        """int32[layout.n_slots]: the sum over ranks of every slot's ternary value."""
        if comm is None:
            return codec.sum_codes(packet[None, :])
        n = comm.world_size
        up = layout.code_traffic()
        if self.config.backend == "allgather":
            gathered = comm.all_gather(torch.from_numpy(packet), "ternary codes all_gather").cpu().numpy()
            self.ledger.record(CollectiveRecord("codes", "all_gather", n, *all_gather_traffic(up, n)))
            return codec.sum_codes(gathered)
        # Server on rank 0: gather the packets, sum, broadcast the exact sums.
        gathered_t = comm.gather(torch.from_numpy(packet), SERVER_RANK, "ternary codes gather to server")
        plane_bytes = layout.sums_bytes()
        down = layout.sums_traffic(n)
        if comm.rank == SERVER_RANK:
            assert gathered_t is not None
            sums = codec.sum_codes(gathered_t.cpu().numpy())
            planes = codec.pack_sums(sums, n, plane_bytes)
            self.ledger.record(CollectiveRecord("codes[server]", "gather", n, Traffic(), up * (n - 1)))
        else:
            planes = np.zeros((codec.level_bits(n), plane_bytes), np.uint8)
            self.ledger.record(CollectiveRecord("codes", "gather", n, up, Traffic()))
        planes_t = comm.broadcast(torch.from_numpy(planes), SERVER_RANK, "ternary sums broadcast from server")
        if comm.rank == SERVER_RANK:
            self.ledger.record(CollectiveRecord("sums[server]", "broadcast", n, down * (n - 1), Traffic()))
            return sums
        self.ledger.record(CollectiveRecord("sums", "broadcast", n, Traffic(), down))
        return codec.unpack_sums(planes_t.cpu().numpy(), n, layout.n_slots)

    def _set_mean_grads(self, layout: codec.CodeLayout, sums: np.ndarray, scales: np.ndarray) -> None:
        for j, i in enumerate(layout.indices):
            p = self._flat[i]
            mean = codec.decode_mean(sums[layout.slots(j)], scales[i], self.world_size)
            g = torch.from_numpy(mean).view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def _config_text(self) -> str:
        return config_text(self.config)

    def state_dict(self) -> dict[str, Any]:
        sd = self.inner.state_dict()
        sd["terngrad"] = counters_state(self)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(restore_counters(self, state_dict, "terngrad"))


def build_terngrad(
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
) -> TernGrad:
    """TernGrad over torch.optim.SGD(lr, momentum=betas[0], weight_decay), as in the paper.

    betas[1] is validated like every optimizer's betas and otherwise unused: SGD with
    momentum has one coefficient. Weight decay is applied by SGD to the averaged ternary
    gradient (exact and identical on every rank), where the reference implementation puts
    L2 in the loss and so ternarizes it with the data gradient.
    """
    check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
    config = TernGradConfig(seed=seed, backend=backend, transport=transport, timeout=timeout)  # type: ignore[arg-type]
    inner = torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)
    return TernGrad(inner, process_group, config=config)

"""Flat CUDA buckets: one kernel launch per bucket and phase instead of one per tensor.

A bucket's parameters and momenta move into one flat buffer each, laid out like the
bucket's bits (tensor i at element 8 * byte_offset_i), and ``p.data`` / ``exp_avg`` become
views of them, as apex's and FSDP's flat parameters do: shapes, dtypes and identities
stay. Gradients are copied into a flat staging buffer (one multi-tensor copy), whose views
then become the ``p.grad`` of the next backward. The sign step, the apply and plain Lion
each run as one launch over the bucket, with the per-tensor betas, lr, weight decay and
coin keys in a slot table. A model with ~150 tensors would otherwise pay ~50 us of Python
per tensor per kernel.

When every tensor is live and the step is not deferred, the sign step updates the momentum in
place. Otherwise it writes the new momentum to a second buffer and ``commit`` takes the slots
that are present: a tensor no rank has a gradient for keeps its momentum, and a deferred step
(overlap, the DDP hook) keeps all until the ranks agree. The apply gives an absent tensor lr
0 and no decay, which leaves it exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dlion.compress.buckets import Bucket
from dlion.kernels import cuda_ops
from dlion.worker.lion.runners import Owner


class FlatRunner:
    flat = True

    def __init__(self, owner: Owner, bucket: Bucket) -> None:
        self.owner, self.bucket = owner, bucket
        params = [p for p, _ in owner.pairs(bucket)]
        dev, dtype = params[0].device, params[0].dtype
        n = 8 * bucket.nbytes
        self.param_flat = torch.zeros(n, dtype=dtype, device=dev)
        self.m_flat = torch.zeros(n, dtype=torch.float32, device=dev)
        self._m_next: torch.Tensor | None = None  # made on first need: most steps update in place
        self.grad_flat = torch.zeros_like(self.param_flat)
        # Views are cut once: a step checks identities, it does not re-slice.
        self._param_views = [self._view(self.param_flat, j, p) for j, p in enumerate(params)]
        self._m_views = [self._view(self.m_flat, j, p) for j, p in enumerate(params)]
        self._grad_views = [self._view(self.grad_flat, j, p) for j, p in enumerate(params)]
        self._tables: dict[tuple[str, tuple[Any, ...]], torch.Tensor] = {}
        self._absent: torch.Tensor | None = None  # the (lr, decay) row of an absent slot
        self.slots = cuda_ops.Slots.of(
            [s.byte_offset for s in bucket.slots], [s.numel for s in bucket.slots], dev
        )

    def _view(self, flat: torch.Tensor, j: int, like: torch.Tensor) -> torch.Tensor:
        s = self.bucket.slots[j]
        return flat[8 * s.byte_offset : 8 * s.byte_offset + s.numel].view(like.shape)

    def bind(self) -> None:
        """Make each p.data and state[p]["exp_avg"] a view of the flat buffers, keeping their
        values; cheap when already bound (after load_state_dict it binds again)."""
        state = self.owner.state
        for (p, _), view, m in zip(
            self.owner.pairs(self.bucket), self._param_views, self._m_views, strict=True
        ):
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.detach())
                p.data = view
            st = state[p]
            old = st.get("exp_avg")
            if old is None or old is not m:
                if old is not None:
                    m.copy_(old)
                else:
                    m.zero_()
                st["exp_avg"] = m

    def stage(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The bucket's gradients, flat (zeros where a tensor has none on this rank). Each
        p.grad then becomes its view of the flat buffer: after zero_grad(set_to_none=False)
        the next backward accumulates straight into it and nothing is copied."""
        dst, src = [], []
        for (p, _), g, view in zip(self.owner.pairs(self.bucket), grads, self._grad_views, strict=True):
            if g is None:
                view.zero_()
            elif g is not view:
                dst.append(view)
                src.append(g)
                p.grad = view
        if src:
            torch._foreach_copy_(dst, src)
        return self.grad_flat

    def _table(self, what: str, values: Sequence[Any]) -> torch.Tensor:
        """A device table of per-slot scalars, uploaded again only when they change."""
        key = (what, tuple(values))
        if key not in self._tables:
            make = cuda_ops.betas_table if what == "betas" else cuda_ops.lr_table
            if len(self._tables) > 8:
                self._tables.clear()
            self._tables[key] = make(values, self.param_flat.device)
        return self._tables[key]

    def _scalars(self, present: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: (beta1, beta2) and (lr, weight decay) of its group; (0, 0) where absent."""
        groups = [g for _, g in self.owner.pairs(self.bucket)]
        on = present if present is not None else [True] * len(groups)
        lr_wd = [
            (g["lr"], g["weight_decay"]) if keep else (0.0, 0.0) for g, keep in zip(groups, on, strict=True)
        ]
        return self._table("betas", [tuple(g["betas"]) for g in groups]), self._table("lrs", lr_wd)

    def sign_step(
        self,
        grads: Sequence[torch.Tensor | None],
        live: Sequence[bool],
        send: torch.Tensor,
        keys: Sequence[int],
        *,
        defer: bool,
    ) -> list[torch.Tensor]:
        """The fused worker step over the bucket, into ``send``. The new momentum replaces the
        old in place, or with ``defer`` or an absent tensor, waits in ``m_next`` (taken now
        for the live slots, unless ``defer``)."""
        self.stage(grads)  # copies only gradients that are not already the flat views
        keys_t = cuda_ops.keys_table(keys, self.param_flat.device)  # new every step
        betas, _ = self._scalars()
        aside = defer or not all(live)
        m_out = self._next_momentum() if aside else None
        cuda_ops.bucket_sign_step(self.grad_flat, self.m_flat, send, self.slots, betas, keys_t, m_out=m_out)
        if aside and not defer:
            self.commit(live)
        return []

    def _next_momentum(self) -> torch.Tensor:
        if self._m_next is None:
            self._m_next = torch.zeros_like(self.m_flat)
        return self._m_next

    def commit(self, present: Sequence[bool]) -> None:
        """Take the new momentum of the slots that are ``present``."""
        m_next = self._next_momentum()
        if all(present):
            self.m_flat.copy_(m_next)
            return
        for j, keep in enumerate(present):
            if keep:
                self._m_views[j].copy_(self._view(m_next, j, self._m_views[j]))

    def apply(
        self, planes: torch.Tensor, table: torch.Tensor, present: Sequence[bool], cautious: bool
    ) -> None:
        _, lrs = self._scalars(present)
        cuda_ops.bucket_apply(
            self.param_flat, planes, table.to(self.param_flat.device), self.slots, lrs, cautious
        )

    def apply_gated(
        self,
        planes: torch.Tensor,
        table: torch.Tensor,
        present: torch.Tensor,
        cautious: bool,
        go: torch.Tensor,
    ) -> None:
        """``apply`` with the slots' presence a device bool[S] and nothing written unless go[0]:
        an absent slot gets lr 0 and no decay, as on the host."""
        _, lrs = self._scalars()
        if self._absent is None:
            self._absent = cuda_ops.lr_table([(0.0, 0.0)], self.param_flat.device)
        lrs = torch.where(present.reshape(-1, 1), lrs, self._absent)
        dev = self.param_flat.device
        cuda_ops.bucket_apply(self.param_flat, planes, table.to(dev), self.slots, lrs, cautious, ok=go)

    def commit_gated(self, present: torch.Tensor, go: torch.Tensor) -> None:
        """``commit`` with the slots' presence a device bool[S], only if go[0]."""
        cuda_ops.bucket_commit(self.m_flat, self._next_momentum(), self.slots, present, go)

    def lion(self, ok: torch.Tensor, cautious: bool) -> None:
        """Plain Lion on the staged gradients; writes nothing unless the device flag ``ok``."""
        betas, lrs = self._scalars()
        cuda_ops.bucket_lion(
            self.param_flat, self.grad_flat, self.m_flat, self.slots, betas, lrs, cautious, ok
        )

"""Overlap: a bucket's sign step and exchange start during backward, as its gradients arrive.

Every rank launches the buckets in one fixed order (last bucket first, as backward meets
them), each as soon as all its gradients are in and every bucket before it in that order
has gone, so the collectives pair up across ranks whatever the timing. step() launches
what backward did not (a tensor with no gradient holds its bucket back) and applies the
results. The sign step runs before the ranks agree on the step (a NaN somewhere, a tensor
without gradients anywhere), so the new momentum waits in a buffer until step() commits
it: results equal the non-overlapped step's, bit for bit.

What says a gradient is final: with ``overlap=True``, a post-accumulate-grad hook per
parameter; under DDP (dlion.attach), the DDP communication hook, once per DDP bucket
(``ready``). On CUDA the buckets run on a side stream, so they overlap the rest of the
backward pass; on the CPU (Gloo) the exchange runs inside the hook, which orders but does
not overlap. One backward per step: a gradient that changes after its bucket left raises.

What happens between backward and step() must reach the vote too. After each backward (once
DDP has copied its buckets back into the gradients) the launcher notes every gradient's object
and version counter; step() compares them (``changed``), so an in-place change (clipping,
GradScaler.unscale_) or a replaced gradient is seen at no cost. Under DDP with
``vote_in_step=None`` the first step, which votes in step() anyway, learns whether this
training loop changes gradients there: if any rank's did, every rank votes in step() from
then on (the hook only silences DDP); else the launcher arms, and a later change raises
GradientChangedError on every rank before anything is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from dlion.worker.lion.runners import Voted


class Overlap:
    def __init__(
        self,
        params: Sequence[Sequence[torch.Tensor]],
        launch: Callable[[int, list[torch.Tensor | None]], Voted],
        *,
        indices: Sequence[Sequence[int]],
        hooks: bool = True,
        accumulate: str = "use overlap=False",
        learn: bool = False,
    ) -> None:
        self._params = [list(ps) for ps in params]  # per bucket
        self._indices = [list(ix) for ix in indices]  # each tensor's in the optimizer, per bucket
        self.learn = learn  # the first step decides whether buckets start in backward
        self._touched: list[tuple[int, int]] = []  # (bucket, slot) ready during this backward
        # (index, parameter, its gradient, the gradient's version) after this step's backward
        self._snapshot: list[tuple[int, torch.Tensor, torch.Tensor | None, int]] | None = None
        self._queued = False
        self._launch = launch
        self._order = list(range(len(self._params)))[::-1]
        self._ready: list[set[int]] = [set() for _ in self._params]
        self._voted: dict[int, Voted] = {}
        self._next = 0
        self.armed = False  # set after the first step, once the fingerprint exchange is done
        first = self._params[0][0]
        self._side = torch.cuda.Stream(first.device) if first.is_cuda else None
        self._slot = {id(p): (k, i) for k, ps in enumerate(self._params) for i, p in enumerate(ps)}
        self._accumulate = accumulate  # what a user who accumulates gradients should do instead
        self._handles = (
            [
                p.register_post_accumulate_grad_hook(partial(self._on_grad, k, i))
                for k, ps in enumerate(self._params)
                for i, p in enumerate(ps)
            ]
            if hooks
            else []
        )

    def ready(self, params: Sequence[torch.Tensor]) -> None:
        """These parameters' gradients are final for this step (parameters the optimizer
        does not hold are none of its business)."""
        for p in params:
            slot = self._slot.get(id(p))
            if slot is not None:
                self._on_grad(*slot, p)

    def _on_grad(self, k: int, i: int, _param: torch.Tensor) -> None:
        self._touched.append((k, i))
        if not self._queued:  # note the gradients once backward, and DDP's copy-back, are done
            self._queued = True
            engine = torch.autograd.Variable._execution_engine
            try:  # DDP queues its copy-back after this: a callback queued by a callback runs last
                engine.queue_callback(lambda: engine.queue_callback(self._take_snapshot))
            except RuntimeError:  # called outside a backward pass: the gradients are as they are
                self._take_snapshot(extend=True)
        if not self.armed:
            return
        if k in self._voted:
            raise RuntimeError(
                f"the gradient of bucket {k} changed after its exchange started: the vote starts "
                f"during backward, so one backward per optimizer step (to accumulate gradients, "
                f"{self._accumulate})"
            )
        self._ready[k].add(i)
        while self._next < len(self._order) and len(self._ready[self._order[self._next]]) == len(
            self._params[self._order[self._next]]
        ):
            self._run_next()

    def _run_next(self) -> None:
        k = self._order[self._next]
        grads = [p.grad for p in self._params[k]]
        if self._side is None:
            self._voted[k] = self._launch(k, grads)
        else:
            main = torch.cuda.current_stream()
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                for g in grads:
                    if g is not None:
                        g.record_stream(self._side)  # backward may free it meanwhile
                voted = self._launch(k, grads)
            voted.record_stream(main)
            self._voted[k] = voted
        self._next += 1

    def _take_snapshot(self, extend: bool = False) -> None:
        """Note the gradients readied since the last note: in place of it after a backward (a
        new backward, as in accumulation, starts over), beside it outside one."""
        self._queued = False
        self._snapshot = (self._snapshot or []) if extend else []
        for k, i in self._touched:
            p = self._params[k][i]
            self._snapshot.append((self._indices[k][i], p, p.grad, -1 if p.grad is None else p.grad._version))
        self._touched = []

    def changed(self) -> int:
        """The optimizer's index of the first gradient that changed since the end of this step's
        backward (modified in place, replaced, set or cleared), or -1."""
        for index, p, g, version in self._snapshot or []:
            if p.grad is not g or (g is not None and g._version != version):
                return index
        return -1

    def collect(self) -> list[Voted]:
        """Launch the buckets backward did not, in order; every bucket's result."""
        try:
            while self._next < len(self._order):
                self._run_next()
            if self._side is not None:
                torch.cuda.current_stream().wait_stream(self._side)
            return [self._voted[k] for k in range(len(self._params))]
        finally:
            self.reset()

    def reset(self) -> None:
        self._ready = [set() for _ in self._params]
        self._voted = {}
        self._next = 0
        self._snapshot, self._touched = None, []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getstate__(self) -> Any:
        raise TypeError("Overlap holds hooks and streams; it is not picklable")


class Launching:
    """What starts an optimizer's buckets during backward, if anything: gradient hooks
    (``overlap=True``) or DDP's communication hook (dlion.attach); re-planned with the buckets.

    ``vote_in_step`` (under DDP): True, the hook only silences DDP and the vote runs in step();
    False, buckets start in backward; None, the first step decides (``learning``, ``decide``)."""

    def __init__(self, launch: Callable[[int, list[torch.Tensor | None]], Voted]) -> None:
        self._launch = launch
        self.launcher: Overlap | None = None
        self.from_ddp = False
        self.vote_in_step: bool | None = None
        self._on_stop: list[Callable[[], None]] = []
        self._plan: tuple[Sequence[Sequence[torch.Tensor]], Sequence[Sequence[int]], bool, bool] = (
            [],
            [],
            False,
            False,
        )

    def plan(
        self,
        params: Sequence[Sequence[torch.Tensor]],
        indices: Sequence[Sequence[int]],
        *,
        hooks: bool,
        possible: bool,
    ) -> None:
        """A launcher for these buckets (``indices``: each tensor's index in the optimizer):
        with per-parameter ``hooks`` (overlap=True), or for DDP's hook once attached; none
        unless buckets can start before step() (``possible``), or the vote runs in step()."""
        self._plan = (params, indices, hooks, possible)
        if self.launcher is not None:
            self.launcher.remove()
            self.launcher = None
        if possible and hooks:
            self.launcher = Overlap(params, self._launch, indices=indices)
        elif possible and self.from_ddp and self.vote_in_step is not True:
            no_sync = "run backward under model.no_sync() for all but the last micro-batch"
            learn = self.vote_in_step is None
            self.launcher = Overlap(
                params, self._launch, indices=indices, hooks=False, accumulate=no_sync, learn=learn
            )

    def _replan(self) -> None:
        params, indices, hooks, possible = self._plan
        self.plan(params, indices, hooks=hooks, possible=possible)

    def attach_ddp(self, on_stop: Callable[[], None], vote_in_step: bool | None) -> None:
        """DDP's hook says what is ready from now on; ``on_stop`` runs when launching stops."""
        self.from_ddp = True
        self.vote_in_step = vote_in_step
        self._on_stop.append(on_stop)
        self._replan()

    @property
    def learning(self) -> bool:
        """Whether this step decides if buckets start in backward from now on."""
        return self.launcher is not None and self.launcher.learn

    def decide(self, *, changed: bool) -> None:
        """What the ranks agreed at a learning step: some rank's gradients changed between
        backward and step() (vote in step() from now on), or none did (start in backward)."""
        self.vote_in_step = changed
        if changed:
            self._replan()
        elif self.launcher is not None:
            self.launcher.learn = False

    def ready(self, params: Sequence[torch.Tensor]) -> None:
        if self.launcher is not None:
            self.launcher.ready(params)

    def changed(self) -> int:
        """The index of the first gradient changed since this step's backward, or -1."""
        return self.launcher.changed() if self.launcher is not None else -1

    def collect(self) -> list[Voted] | None:
        """Every bucket's vote, launched now where backward did not; None without a launcher
        or before it is armed (the first step runs whole in step(), after the fingerprint)."""
        if self.launcher is None:
            return None
        if not self.launcher.armed:
            self.launcher.reset()
            return None
        return self.launcher.collect()

    def arm(self) -> None:
        if self.launcher is not None and not self.launcher.learn:
            self.launcher.armed = True

    def stop(self) -> None:
        """No more buckets start during backward: gradient hooks removed, DDP hooks detached."""
        if self.launcher is not None:
            self.launcher.remove()
            self.launcher = None
        self.from_ddp = False
        stops, self._on_stop = self._on_stop, []
        for stop in stops:
            stop()

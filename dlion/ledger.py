"""The byte ledger: what one rank sends and receives, per step and per collective.

Counts are kept in bits so 1-bit payloads of any length are exact; totals of whole
messages are whole bytes. Each collective's traffic follows docs/design.md's cost model
(see the ``*_traffic`` functions), applied to the buffer sizes actually sent.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

KINDS: tuple[str, ...] = ("payload", "padding", "metadata", "indices", "scalers")


@dataclass(frozen=True)
class Traffic:
    """Bits in one direction, split by what they carry.

    payload: the values themselves (sign bits, ternary codes, fp32 gradients); padding:
    alignment fill; metadata: headers and agreement exchanges; indices: positions of
    sparse values; scalers: per-tensor scales (TernGrad).
    """

    payload: int = 0
    padding: int = 0
    metadata: int = 0
    indices: int = 0
    scalers: int = 0

    @property
    def bits(self) -> int:
        return self.payload + self.padding + self.metadata + self.indices + self.scalers

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(getattr(self, k) + getattr(other, k) for k in KINDS))

    def __mul__(self, k: int) -> Traffic:
        return Traffic(*(getattr(self, kind) * k for kind in KINDS))


NO_TRAFFIC = Traffic()


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective as seen by this rank."""

    name: str  # what was exchanged, e.g. "bucket0" or "meta"
    op: str  # the collective, e.g. "all_gather"
    world_size: int
    sent: Traffic
    received: Traffic
    scope: str = "net"  # "node": between the ranks of one node (the hierarchical backend)


def all_gather_traffic(chunk: Traffic, world_size: int) -> tuple[Traffic, Traffic]:
    """Ring all_gather, each rank owning ``chunk``: (N-1) chunks sent and received."""
    return chunk * (world_size - 1), chunk * (world_size - 1)


def all_reduce_traffic(buffer: Traffic, world_size: int) -> tuple[Traffic, Traffic]:
    """Ring all_reduce of a buffer of S bits: 2 (N-1)/N S each way.

    The caller pads the buffer so each of its N chunks is whole, making the total exact.
    Which chunks carry the padding differs by rank, so padding and metadata are counted in
    proportion (rounded down) and the payload takes the rest.
    """
    n = world_size
    if buffer.bits * 2 * (n - 1) % n:
        raise ValueError(f"all_reduce buffer {buffer} does not split into {n} whole chunks")
    total = buffer.bits * 2 * (n - 1) // n
    share = {k: getattr(buffer, k) * 2 * (n - 1) // n for k in KINDS[1:]}
    each = Traffic(payload=total - sum(share.values()), **share)
    return each, each


@dataclass
class Ledger:
    """Per-step collective records for one rank, and running totals.

    ``n_params`` is the number of optimised parameters (elements), the denominator of
    the bits-per-parameter figures. Totals and each step's (sent, received) bytes cover
    every step; ``steps`` keeps the records themselves of the last ``keep_records`` steps
    only (None: all), so a run of millions of steps holds 16 bytes per step, not its records.
    """

    n_params: int = 0
    keep_records: int | None = None
    steps: list[list[CollectiveRecord]] = field(default_factory=list)
    # Messages outside any step (a dedicated server's handshake, stop and totals): in the
    # totals, not in the per-step figures.
    extra: list[CollectiveRecord] = field(default_factory=list)
    _open: list[CollectiveRecord] | None = None
    _sent: Traffic = NO_TRAFFIC
    _received: Traffic = NO_TRAFFIC
    _collectives: int = 0
    _node_bits: list[int] = field(default_factory=lambda: [0, 0])  # sent, received inside nodes
    _step_bits: array = field(default_factory=lambda: array("q"))  # sent, received, sent, ...

    def begin_step(self) -> None:
        self._open = []

    @property
    def last_step_silent(self) -> bool:
        """Whether a last step was recorded, closed, and sent nothing (``reopen_step`` may open it)."""
        return self._open is None and len(self._step_bits) >= 2 and not any(self._step_bits[-2:])

    def reopen_step(self) -> None:
        """Open the last step again, to add records to it: a step that sent nothing (a local
        step), whose round is then ended by a call after it (LocalSteps.sync)."""
        if not self.last_step_silent:
            raise RuntimeError("Ledger.reopen_step needs a closed last step that sent nothing")
        del self._step_bits[-2:]
        if self.steps:
            self.steps.pop()
        self._open = []

    @property
    def in_step(self) -> bool:
        return self._open is not None

    def record(self, rec: CollectiveRecord) -> None:
        if self._open is None:
            raise RuntimeError("Ledger.record called outside a step")
        self._open.append(rec)

    def record_extra(self, rec: CollectiveRecord) -> None:
        """A message outside any step."""
        self.extra.append(rec)
        self._sent, self._received = self._sent + rec.sent, self._received + rec.received

    def end_step(self) -> None:
        if self._open is None:
            raise RuntimeError("Ledger.end_step called without begin_step")
        recs, self._open = self._open, None
        sent = sum((r.sent for r in recs), NO_TRAFFIC)
        received = sum((r.received for r in recs), NO_TRAFFIC)
        self._sent, self._received = self._sent + sent, self._received + received
        self._collectives += len(recs)
        for r in recs:
            if r.scope != "net":
                self._node_bits[0] += r.sent.bits
                self._node_bits[1] += r.received.bits
        self._step_bits.extend((sent.bits, received.bits))
        self.steps.append(recs)
        if self.keep_records is not None and len(self.steps) > self.keep_records:
            del self.steps[: len(self.steps) - self.keep_records]

    @property
    def n_steps(self) -> int:
        return len(self._step_bits) // 2

    def step_bytes(self) -> list[tuple[int, int]]:
        """(bytes sent, bytes received) of each step."""
        bits = self._step_bits
        return [(bits[i] // 8, bits[i + 1] // 8) for i in range(0, len(bits), 2)]

    def totals(self) -> tuple[Traffic, Traffic]:
        return self._sent, self._received

    def summary(self) -> dict[str, Any]:
        """Totals in bytes (one-off messages outside steps included), and the bits per
        parameter per step, up and down, over the steps alone: a run's handshakes and its
        first broadcast of the parameters do not read as a per-step cost. ``one_off_bytes_*``
        is the part of the totals outside any step."""
        sent, received = self.totals()
        steps = self.n_steps
        one_off_sent = sum(r.sent.bits for r in self.extra) // 8
        one_off_received = sum(r.received.bits for r in self.extra) // 8
        denom = max(1, steps) * max(1, self.n_params)
        return {
            "steps": steps,
            "n_params": self.n_params,
            "bytes_sent": sent.bits // 8,
            "bytes_received": received.bits // 8,
            "one_off_bytes_sent": one_off_sent,
            "one_off_bytes_received": one_off_received,
            "bits_per_param_up": sum(self._step_bits[0::2]) / denom,
            "bits_per_param_down": sum(self._step_bits[1::2]) / denom,
            "sent_bytes_by_kind": _whole_bytes(sent),
            "received_bytes_by_kind": _whole_bytes(received),
            "collectives_per_step": self._collectives / steps if steps else 0.0,
            # Inside nodes (the hierarchical backend's fp32 reduce-scatter and bit all_gather),
            # part of the totals above; the rest crossed the network between nodes.
            "node_bytes_sent": self._node_bits[0] // 8,
            "node_bytes_received": self._node_bits[1] // 8,
            "node_bits_per_param_up": self._node_bits[0] / denom,
            "node_bits_per_param_down": self._node_bits[1] / denom,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and ints, so a checkpoint loads with ``weights_only=True``."""
        return {
            "n_params": self.n_params,
            "steps": [[_record_row(r) for r in recs] for recs in self.steps],
            "extra": [_record_row(r) for r in self.extra],
            "totals": [[getattr(t, k) for k in KINDS] for t in (self._sent, self._received)],
            "collectives": self._collectives,
            "step_bits": self._step_bits.tolist(),
            "node_bits": list(self._node_bits),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with those of ``state``; the parameter count must match."""
        if int(state["n_params"]) != self.n_params:
            raise ValueError(
                f"ledger state counts {state['n_params']} parameters, this optimizer has {self.n_params}"
            )
        self.steps = [[_record_from_row(row) for row in recs] for recs in state["steps"]]
        self.extra = [_record_from_row(row) for row in state["extra"]]
        self._open = None
        sent, received = state["totals"]
        self._sent, self._received = Traffic(*map(int, sent)), Traffic(*map(int, received))
        self._collectives = int(state["collectives"])
        self._step_bits = array("q", map(int, state["step_bits"]))
        self._node_bits = [int(v) for v in state.get("node_bits", [0, 0])]


def _whole_bytes(t: Traffic) -> dict[str, int]:
    """Bytes by kind, whole: every kind but the payload rounded down, the payload the rest,
    so the kinds add up to the total."""
    out = {k: getattr(t, k) // 8 for k in KINDS[1:]}
    return {"payload": t.bits // 8 - sum(out.values()), **out}


def fp32_ring_bits_per_param(world_size: int) -> float:
    """What a ring all-reduce of fp32 gradients sends (and receives) per parameter per step,
    each way, at N ranks: 2 (N-1)/N x 32 bits; 0 for one rank."""
    return 64 * (world_size - 1) / world_size if world_size > 1 else 0.0


def saving(summary: dict[str, Any], world_size: int) -> dict[str, Any]:
    """A ledger summary beside fp32 all-reduce at the same N: the reference bits per parameter
    each way, and how many times fewer the heavier of this run's two directions carries over
    the network (the hierarchical backend's bytes inside nodes left out)."""
    ref = fp32_ring_bits_per_param(world_size)
    up, down = (
        float(summary[f"bits_per_param_{d}"]) - float(summary.get(f"node_bits_per_param_{d}", 0.0))
        for d in ("up", "down")
    )
    heavier = max(up, down)
    return {
        "fp32_allreduce_bits_per_param": ref,
        "fewer_than_fp32": ref / heavier if heavier > 0 and ref else None,
    }


def _record_row(r: CollectiveRecord) -> list[Any]:
    return [
        r.name,
        r.op,
        r.world_size,
        [getattr(r.sent, k) for k in KINDS],
        [getattr(r.received, k) for k in KINDS],
        r.scope,
    ]


def _record_from_row(row: list[Any]) -> CollectiveRecord:
    name, op, world_size, sent, received, *scope = row  # rows saved before scopes have none
    return CollectiveRecord(
        str(name),
        str(op),
        int(world_size),
        Traffic(*map(int, sent)),
        Traffic(*map(int, received)),
        str(scope[0]) if scope else "net",
    )

"""The messages between workers and a dedicated parameter server, and how they are checked.

Workers are ranks 0..N-1 of the job and the server is rank N. They talk point to point;
every message is a flat buffer whose length both sides know before it is sent:

  hello   worker -> server, once: int64[8] header, then int64[2 n_buckets] layout
  ack     server -> worker, once: int64[2] (magic, status)
  step    worker -> server, per exchanging step: int64[3] (magic, op, step)
  bits    worker -> server, per bucket: uint8[S]
  result  server -> worker, per bucket: uint8[B, S]
  totals  server -> worker, after op STOP: int64[8] (magic, steps, bits sent and received
          by kind), so the job's report carries the server's traffic

A header that is not dlion's, or of another format, is refused by name (``header_error``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dlion.aggregate.votes import BucketWire
from dlion.compress.sign import result_layout
from dlion.ledger import Traffic

MAGIC = 0x644C696F6E5053  # "dLionPS"
FORMAT = 1  # bump when these messages change
OP_STEP, OP_STOP = 1, 2
VOTE_CODES = {"majority": 0, "average": 1}
TIE_CODES = {"random": 0, "zero": 1}
HEADER_WORDS = 8


@dataclass(frozen=True)
class Hello:
    """What the server must know before the first bucket: identical from every worker."""

    n_workers: int
    vote: str
    tie: str
    seed: int
    result_planes: int
    buckets: tuple[tuple[int, int], ...]  # (bytes, payload bits) per bucket

    @staticmethod
    def of(n_workers: int, vote: str, tie: str, seed: int, wires: Sequence[BucketWire]) -> Hello:
        """A worker's hello for its buckets; the reply's planes follow from vote, tie and N."""
        planes, _ = result_layout(vote=vote, tie=tie, n_workers=n_workers)
        layout = tuple((w.nbytes, w.payload_bits_in(0, w.nbytes)) for w in wires)
        return Hello(n_workers, vote, tie, seed, planes, layout)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        header = [MAGIC, FORMAT, self.n_workers, VOTE_CODES[self.vote], TIE_CODES[self.tie]]
        header += [self.seed, self.result_planes, len(self.buckets)]
        layout = [v for b in self.buckets for v in b]
        return torch.tensor(header, dtype=torch.int64), torch.tensor(layout, dtype=torch.int64)

    @staticmethod
    def decode(header: list[int], layout: list[int]) -> Hello:
        votes = {v: k for k, v in VOTE_CODES.items()}
        ties = {v: k for k, v in TIE_CODES.items()}
        pairs = tuple(zip(layout[0::2], layout[1::2], strict=True))
        return Hello(header[2], votes[header[3]], ties[header[4]], header[5], header[6], pairs)


def header_error(header: list[int]) -> str | None:
    if header[0] != MAGIC:
        return f"bad magic {header[0]:#x}: the peer is not a dlion worker"
    if header[1] != FORMAT:
        return f"message format {header[1]} differs from this server's {FORMAT}: mixed dlion versions"
    if header[3] not in VOTE_CODES.values() or header[4] not in TIE_CODES.values() or header[7] < 0:
        return f"malformed hello header {header}"
    return None


def totals_summary(values: list[int]) -> dict[str, Any]:
    """The server's totals message as a ledger-like summary, in bytes."""
    steps, sp, spad, smeta, rp, rpad, rmeta = values
    return {
        "steps": steps,
        "bytes_sent": (sp + spad + smeta) // 8,
        "bytes_received": (rp + rpad + rmeta) // 8,
        # Sign bits carry no indices or scalers.
        "sent_bytes_by_kind": {"payload": sp / 8, "padding": spad / 8, "metadata": smeta / 8}
        | {"indices": 0.0, "scalers": 0.0},
        "received_bytes_by_kind": {"payload": rp / 8, "padding": rpad / 8, "metadata": rmeta / 8}
        | {"indices": 0.0, "scalers": 0.0},
    }


def full_traffic(nbytes: int, payload_bits: int) -> Traffic:
    return Traffic(payload=payload_bits, padding=8 * nbytes - payload_bits)

"""The training job's progress display on rank 0."""

from __future__ import annotations

import sys

from tqdm import tqdm

from dlion.ledger import Ledger


class Progress:
    """tqdm on a terminal; a plain line every tenth of the run when the output is a file."""

    def __init__(self, steps: int, enabled: bool) -> None:
        self.steps = steps
        self.enabled = enabled
        self.bar = (
            tqdm(total=steps, unit="step", dynamic_ncols=True) if enabled and sys.stderr.isatty() else None
        )
        self.every = max(1, steps // 10)
        # Ledger totals are summed over every step so far: refresh them only now and then.
        self.bar_every = max(1, steps // 200)

    def update(self, step: int, loss: float, ledger: Ledger, val: float | None) -> None:
        if not self.enabled:
            return
        last = step == self.steps
        if self.bar is not None:
            if step % self.bar_every == 0 or last:
                sent = ledger.summary()["bytes_sent"] / 1e6
                self.bar.set_postfix(loss=f"{loss:.3f}", sent=f"{sent:.2f}MB", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or last:
            sent = ledger.summary()["bytes_sent"] / 1e6
            val_text = f" val {val:.4f}" if val is not None else ""
            print(f"step {step}/{self.steps} loss {loss:.4f}{val_text} sent {sent:.2f} MB", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Time to quality projected to 64..1,024 GPUs by the cost model (``bench.project.model``).

Per scenario and N: a step is the scenario's compute (per GPU, the same tokens per GPU at
every N) plus the method's communication at the scenario's link rate and start-up latency,
one after the other; a method reaches a target in the steps our language model's run took.
That last step is the assumption a reader must weigh: steps to a target measured on a small
model at 4 workers, carried to a 124M model at N. Local-step methods meet once per H steps,
so their communication per step is their outer exchange's over H. PowerSGD is left out: its
bytes follow the model's matrix shapes, which the cost model's synthetic tensors do not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.project.model import BY_LABEL, FP32_RING, FP32_TREE, project
from bench.ttq.scenarios import Scenario

WORKERS: tuple[int, ...] = (64, 128, 256, 512, 1024)
# Per-message start-up: Ethernet in one data centre, and a link between regions (half a
# 20 ms round trip).
ALPHA_S = {"25gbe": 25e-6, "10gbe": 25e-6, "cross-region": 10e-3}
_VOTE = BY_LABEL["dlion-mavo sharded"]


@dataclass(frozen=True)
class Method:
    """How a table row communicates: the collective family, met once per ``every`` steps."""

    family: str  # "fp32" (ring or tree, the faster) or "vote" (sharded majority vote)
    every: int = 1


METHODS: dict[str, Method] = {
    "adamw-global": Method("fp32"),
    "lion-global": Method("fp32"),
    "dlion-mavo": Method("vote"),
    "diloco-h16": Method("fp32", 16),
    "dlion-local-h16": Method("vote", 16),
    "dlion-local-h16-ef": Method("vote", 16),
}


def comm_s(method: Method, sc: Scenario, n: int) -> float:
    """Seconds of communication per step, averaged over a round."""
    alpha, d = ALPHA_S.get(sc.name, 25e-6), int(sc.params)
    if method.family == "fp32":
        ms = min(project(m, n, d, sc.link_gbits, alpha).comm_ms for m in (FP32_RING, FP32_TREE))
    else:
        ms = project(_VOTE, n, d, sc.link_gbits, alpha).comm_ms
    return ms / 1e3 / method.every


def step_s(row: str, sc: Scenario, n: int) -> float:
    return sc.compute_s + comm_s(METHODS[row], sc, n)


def table(
    sc: Scenario, steps_to: dict[str, int | None], *, label: str, workers: Sequence[int] = WORKERS
) -> str:
    """Markdown: each row's projected time to the target at each N, and x sooner than adamw-global."""
    head = "| row | steps to " + label + " | " + " | ".join(f"N = {n}" for n in workers) + " |"
    lines = [
        f"**{sc.name}** projected ({sc.title}, {ALPHA_S.get(sc.name, 25e-6) * 1e6:g} us per message; "
        f"hours to {label}, and x sooner than adamw-global)",
        "",
        head,
        "|---|--:|" + "--:|" * len(workers),
    ]
    base = steps_to.get("adamw-global")
    for row, steps in steps_to.items():
        if row not in METHODS:
            continue
        cells = []
        for n in workers:
            if steps is None:
                cells.append("not reached")
                continue
            hours = steps * step_s(row, sc, n) / 3600
            sooner = "" if base is None else f" ({base * step_s('adamw-global', sc, n) / 3600 / hours:.1f}x)"
            cells.append(f"{hours:.2f}{sooner}")
        lines.append(f"| {row} | {steps if steps is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

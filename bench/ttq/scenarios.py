"""The declared clusters: each one's ratio of fp32 all-reduce time to step compute, from stated
numbers, and the link rate at which the emulated cluster has the same ratio.

What decides whether a communication-efficient optimizer wins on wall clock is how long a
step's fp32 all-reduce takes against the step's compute. A scenario states a real setting
(model, tokens per GPU per step, achieved FLOP/s, nodes, link rate), derives that ratio, and
``emulated_rate`` gives the rate at which our language model's fp32 all-reduce on the
emulated hosts costs the same multiple of its measured step compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FP32_BYTES = 4
MIN_RATE_BITS, MAX_RATE_BITS = 1e5, 1e11  # what launch.netns shapes
MIN_BURST_BYTES = 6000  # four packets: a bigger bucket would let small messages through free


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A GPT trained data-parallel, one GPU per node, gradients all-reduced in fp32 by a ring
    once per optimizer step (gradient accumulation in between sends nothing)."""

    name: str
    title: str
    params: float  # the model's parameters
    layers: int
    d_model: int
    context: int
    tokens_per_gpu: int  # per optimizer step
    achieved_flops: float  # per GPU, FLOP/s actually reached
    nodes: int
    link_gbits: float  # each node's link, each way

    def __post_init__(self) -> None:
        for name in (
            "params",
            "layers",
            "d_model",
            "context",
            "tokens_per_gpu",
            "achieved_flops",
            "link_gbits",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"scenario {self.name!r}: {name} must be > 0, got {value!r}")
        if self.nodes < 2:
            raise ValueError(f"scenario {self.name!r}: nodes must be >= 2, got {self.nodes}")

    @property
    def flop_per_token(self) -> float:
        # 6N for the matrix products forward and backward, plus attention's 12 L d T (PaLM's count).
        return 6 * self.params + 12 * self.layers * self.d_model * self.context

    @property
    def compute_s(self) -> float:
        return self.flop_per_token * self.tokens_per_gpu / self.achieved_flops

    @property
    def allreduce_bytes(self) -> float:
        """What one node sends (and receives) in a ring all-reduce of the fp32 gradients."""
        return 2 * (self.nodes - 1) / self.nodes * self.params * FP32_BYTES

    @property
    def allreduce_s(self) -> float:
        return self.allreduce_bytes * 8 / (self.link_gbits * 1e9)

    @property
    def ratio(self) -> float:
        """fp32 all-reduce time / compute time per step."""
        return self.allreduce_s / self.compute_s


def emulated_rate_bits(scenario: Scenario, *, allreduce_bytes: float, compute_s: float) -> float:
    """Bits per second per link at which ``allreduce_bytes`` (what one emulated host sends in
    the fp32 ring all-reduce of our model) take ``scenario.ratio`` times ``compute_s``."""
    if not allreduce_bytes > 0 or not compute_s > 0:
        raise ValueError(f"need allreduce_bytes > 0 and compute_s > 0, got {allreduce_bytes}, {compute_s}")
    bits = allreduce_bytes * 8 / (scenario.ratio * compute_s)
    if not MIN_RATE_BITS <= bits <= MAX_RATE_BITS:
        raise ValueError(
            f"scenario {scenario.name!r} ({scenario.ratio:.2f}x) needs {bits / 1e3:,.0f} kbit/s at a compute "
            f"of {compute_s:.3f} s per step: outside what the emulated links shape (100 kbit/s to 100 Gbit/s)"
        )
    return bits


def rate_text(bits: float) -> str:
    """tc's rate syntax, in whole kbit/s."""
    return f"{round(bits / 1e3)}kbit"


def burst_bytes(bits: float) -> int:
    """The tbf bucket: 2 ms at the rate, at least MIN_BURST_BYTES."""
    return max(MIN_BURST_BYTES, int(bits / 8 * 0.002))


_GPT2: dict[str, Any] = dict(
    params=124e6,
    layers=12,
    d_model=768,
    context=1024,
    tokens_per_gpu=32 * 1024,
    achieved_flops=300e12,
    nodes=8,
)
# GPT-2 small (124M) as nanoGPT trains it: 32 sequences of 1,024 tokens per GPU per step, an
# H100 at 300 TFLOP/s achieved (30% of its dense bf16 peak), 8 nodes with one GPU each.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(name="25gbe", title="124M GPT, 8 nodes x 1 H100, 25 Gbit/s Ethernet", link_gbits=25, **_GPT2),
    Scenario(name="10gbe", title="124M GPT, 8 nodes x 1 H100, 10 Gbit/s Ethernet", link_gbits=10, **_GPT2),
    Scenario(
        name="cross-region",
        title="124M GPT, 8 nodes x 1 H100, 1 Gbit/s between regions",
        link_gbits=1,
        **_GPT2,
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}


def derivation_table(scenarios: tuple[Scenario, ...] = SCENARIOS) -> str:
    """Markdown: each scenario's numbers and the ratio they give."""
    lines = [
        "| scenario | setting | FLOP per token | compute per step | fp32 all-reduce per node | at | "
        "all-reduce time | ratio |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for s in scenarios:
        lines.append(
            f"| {s.name} | {s.title}; {s.tokens_per_gpu:,} tokens per GPU per step at "
            f"{s.achieved_flops / 1e12:.0f} TFLOP/s | {s.flop_per_token / 1e6:.0f} M | "
            f"{1e3 * s.compute_s:.1f} ms | "
            f"{s.allreduce_bytes / 1e6:.0f} MB | {s.link_gbits:g} Gbit/s | {1e3 * s.allreduce_s:.0f} ms | "
            f"{s.ratio:.2f}x |"
        )
    return "\n".join(lines)

"""The GPU path on one GPU: kernels against a copy, optimizer steps against fused AdamW.

    python -m bench.gpu [--quick] [--log2n 28] [--layers 17] [--iters 20] [--json PATH]

1. Each CUDA kernel on 2^log2n elements as a fraction of a device-to-device copy of the
   same bytes (bench/gpu/kernels.py). Targets: pack and the fused worker step >= 0.7.
2. One optimizer step on a ByteGPT of ~125M parameters (d_model 768, 17 layers, ~200
   tensors, random gradients): DistributedLion at world size 1, and at world size 1 with
   the communication path forced on (NCCL, sharded backend), against torch's fused AdamW
   and dlion.Lion (a torch-ops reference Lion). Target: DistributedLion <= 1.2x AdamW.
3. Training time per step of that model on byte windows (forward, backward, step).
4. Host synchronisation: one communicating step (world size 1, comm forced, NCCL,
   nonfinite="skip") under torch.cuda.set_sync_debug_mode("error"): none may happen.

``--quick`` (the one-call device check): 5 timed calls per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from bench.gpu.kernels import KernelRow, cuda_ms, kernel_rows
from dlion import DistributedLion, Lion
from dlion.train.model import ByteGPT, ModelConfig

STEP_TARGET = 1.2  # DistributedLion step time / fused AdamW step time


@dataclass(frozen=True)
class StepRow:
    name: str
    step_ms: float  # optimizer step alone
    train_ms: float  # forward + backward + step
    of_adamw: float = 0.0


def _optimizers(
    params: list[torch.nn.Parameter], nccl: dist.ProcessGroup
) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    return {
        "AdamW (torch, fused)": lambda: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True),
        "Lion (dlion.Lion, torch ops)": lambda: Lion(params, lr=1e-4, weight_decay=0.1),
        "DistributedLion, world size 1": lambda: DistributedLion(params, lr=1e-4, weight_decay=0.1),
        "DistributedLion, world size 1, comm forced (NCCL, sharded)": lambda: DistributedLion(
            params, lr=1e-4, weight_decay=0.1, force_comm=True, backend="sharded", process_group=nccl
        ),
        "DistributedLion, world size 1, comm forced, overlap=True": lambda: DistributedLion(
            params,
            lr=1e-4,
            weight_decay=0.1,
            force_comm=True,
            backend="sharded",
            process_group=nccl,
            overlap=True,
        ),
    }


def step_rows(layers: int, iters: int, batch: int) -> tuple[int, int, list[StepRow]]:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    nccl = dist.new_group([0], backend="nccl")
    cfg = ModelConfig(context=1024, d_model=768, layers=layers, heads=12)
    model = ByteGPT(cfg).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = torch.randint(0, 256, (batch, cfg.context + 1), device="cuda", generator=gen)
    rows = []
    for name, make in _optimizers(params, nccl).items():
        opt = make()
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
        step_ms = cuda_ms(opt.step, iters)

        def train_step(opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(data[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 256), data[:, 1:].reshape(-1))
            loss.backward()
            opt.step()

        rows.append(StepRow(name, step_ms, cuda_ms(train_step, iters)))
        if isinstance(opt, DistributedLion):
            opt.close()  # removes overlap's gradient hooks
        del opt
        torch.cuda.empty_cache()
    base = rows[0].step_ms
    rows = [StepRow(r.name, r.step_ms, r.train_ms, r.step_ms / base) for r in rows]
    return sum(p.numel() for p in params), len(params), rows


def sync_check(layers: int) -> str:
    """'none', or the first synchronising call a communicating step made (its message)."""
    nccl = dist.new_group([0], backend="nccl")
    model = ByteGPT(ModelConfig(context=64, d_model=768, layers=layers, heads=12)).cuda()
    params = list(model.parameters())
    opt = DistributedLion(
        params, lr=1e-4, force_comm=True, backend="sharded", process_group=nccl, nonfinite="skip"
    )
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # the first step exchanges the fingerprint and starts the ranks equal (host reads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        found = "none"
    except RuntimeError as err:
        found = str(err).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return found


def report(
    n: int, kernels: list[KernelRow], n_params: int, n_tensors: int, steps: list[StepRow], syncs: str = "-"
) -> tuple[str, bool]:
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    lines += [
        f"kernels on 2^{n.bit_length() - 1} elements (fraction of a device-to-device copy of the same bytes)"
    ]
    lines += [f"{'kernel':<40} {'ms':>8} {'GB/s':>8} {'of copy':>8} {'target':>7} status"]
    for r in kernels:
        gbps = r.bytes_moved / r.ms / 1e6
        tgt = f">={r.target}" if r.target else "-"
        lines.append(f"{r.name:<40} {r.ms:8.3f} {gbps:8.0f} {r.of_copy:8.3f} {tgt:>7} {r.status}")
    lines += ["", f"optimizer step, ByteGPT {n_params / 1e6:.1f}M parameters in {n_tensors} tensors"]
    lines += [f"{'optimizer':<60} {'step ms':>8} {'x AdamW':>8} {'train ms':>9}"]
    for s in steps:
        lines.append(f"{s.name:<60} {s.step_ms:8.3f} {s.of_adamw:8.2f} {s.train_ms:9.2f}")
    dlion_rows = [s for s in steps if s.name.startswith("DistributedLion") and "overlap" not in s.name]
    lines.append(f"host synchronisations in a communicating step: {syncs}")
    ok = all(r.status != "MISS" for r in kernels) and all(s.of_adamw <= STEP_TARGET for s in dlion_rows)
    ok = ok and syncs == "none"
    lines.append(f"targets: kernels >= 0.7 of copy, DistributedLion step <= {STEP_TARGET}x AdamW: "
                 f"{'met' if ok else 'NOT met'}")  # fmt: skip
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlion bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--log2n", type=int, default=28, help="kernel size, 2^N elements (default: %(default)s)")
    p.add_argument(
        "--layers", type=int, default=17, help="ByteGPT layers, d_model 768 (default: %(default)s)"
    )
    p.add_argument(
        "--batch", type=int, default=8, help="windows of 1024 bytes per step (default: %(default)s)"
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per row (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="5 timed calls per row: the one-call device check")
    args = p.parse_args(argv)
    if args.quick:
        args.iters = 5
    if not torch.cuda.is_available():
        print("dlion bench gpu needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    if not 10 <= args.log2n <= 30:
        p.error(f"--log2n must be in [10, 30], got {args.log2n}")
    n = 1 << args.log2n
    kernels = kernel_rows(n, args.iters)
    torch.cuda.empty_cache()
    n_params, n_tensors, steps = step_rows(args.layers, args.iters, args.batch)
    torch.cuda.empty_cache()
    syncs = sync_check(args.layers)
    text, ok = report(n, kernels, n_params, n_tensors, steps, syncs)
    print(text)
    if args.json:
        blob = {
            "kernels": [asdict(r) | {"of_copy": r.of_copy} for r in kernels],
            "steps": [asdict(s) for s in steps],
            "n_params": n_params,
            "n_tensors": n_tensors,
            "host_syncs": syncs,
            "ok": ok,
        }
        args.json.write_text(json.dumps(blob, indent=2))
    return 0 if ok else 1

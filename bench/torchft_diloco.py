"""torchft's own DiLoCo (torchft.local_sgd.DiLoCo, torchft 0.2.0) with 2 replicas on CPU over
Gloo, printing the final parameters' float32 bits: the reference that
tests/test_local_steps.py::test_diloco_equals_torchfts_bit_for_bit holds dlion's diloco to.

torchft is not a dependency of dlion: run this in an environment of its own
(``pip install torch==2.13.0 torchft==0.2.0``).

Usage:
  python -m bench.torchft_diloco        # mode "fake": NO lighthouse. A tiny stand-in Manager
                                  # (same allreduce numerics as torchft.manager.Manager:
                                  #  SUM over the PG, then `tensor /= num_participants`)
                                  # on a plain torch.distributed Gloo group.
  python -m bench.torchft_diloco real   # mode "real": the real torchft Manager +
                                  # torchft ProcessGroupGloo, with an in-process
                                  # torchft LighthouseServer (cross-check only).

Setup (all fixed):
  model        : torch.manual_seed(0); nn.Linear(4, 3)  (same init on both ranks)
  data (rank r): g = torch.Generator().manual_seed(1000 + r)
                 x = torch.randn(8, 4, generator=g); y = torch.randn(8, 3, generator=g)
                 same batch every step; loss = F.mse_loss(model(x), y)
  inner opt    : torch.optim.AdamW(lr=1e-2)  (defaults: betas=(0.9,0.999), eps=1e-8,
                 weight_decay=0.01; CPU -> single-tensor (for-loop) implementation)
  outer opt    : torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)
  DiLoCo       : sync_every=2, one fragment ([model]), should_quantize=False,
                 fragment_sync_delay=0, fragment_update_alpha=0.0
  steps        : 6 inner steps (-> 3 outer syncs, after inner steps 2, 4, 6)
  training loop: per step: inner_opt.zero_grad(); loss.backward(); inner_opt.step()
                 (DiLoCo hooks into inner_opt.step via a step post-hook)
"""

import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torchft.local_sgd import DiLoCo
from torchft.work import _DummyWork

WORLD = 2
STEPS = 6
SYNC_EVERY = 2


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class FixedWorldManager:
    """Minimal stand-in for torchft.manager.Manager with a fixed world of healthy
    replicas (no lighthouse, no quorum, no recovery). Implements exactly the methods
    DiLoCo calls. allreduce mirrors Manager.allreduce with ReduceOp.AVG:
    pg allreduce with SUM, then `tensor /= num_participants`."""

    _use_async_quorum = False

    def __init__(self, world_size: int) -> None:
        self._world = world_size
        self._step = 0

    def allow_state_dict_read(self) -> None: ...
    def disallow_state_dict_read(self) -> None: ...
    def register_state_dict_fn(self, key, load_fn, save_fn) -> None: ...
    def start_quorum(self, *a, **k) -> None: ...
    def errored(self):
        return None

    def num_participants(self) -> int:
        return self._world

    def current_step(self) -> int:
        return self._step

    def allreduce(self, tensor, should_quantize: bool = False):
        assert not should_quantize
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= self._world
        return _DummyWork(tensor)

    def should_commit(self, timeout=None) -> bool:
        self._step += 1
        return True

    def shutdown(self, wait: bool = True) -> None: ...


def hexbits(t: torch.Tensor) -> str:
    return " ".join(f"{v:08x}" for v in t.detach().contiguous().view(-1).numpy().view("uint32"))


def make_data(rank: int):
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(8, 4, generator=g)
    y = torch.randn(8, 3, generator=g)
    return x, y


def worker(rank: int, mode: str, port: int, lh_addr: str, store_ports, q) -> None:
    torch.set_printoptions(precision=10)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = make_data(rank)

    lines = []
    if rank == 0:
        for n, p in model.named_parameters():
            lines.append(f"init {n} = {p.data}")
            lines.append(f"init {n} hex = {hexbits(p)}")
    lines.append(f"rank{rank} x = {x}")
    lines.append(f"rank{rank} x hex = {hexbits(x)}")
    lines.append(f"rank{rank} y = {y}")
    lines.append(f"rank{rank} y hex = {hexbits(y)}")

    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)

    if mode == "fake":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        manager = FixedWorldManager(WORLD)
    else:
        from torch.distributed import TCPStore
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        # each replica is its own replica group of size 1 with its own TCPStore
        _store = TCPStore("127.0.0.1", store_ports[rank], is_master=True, wait_for_workers=False)
        manager = Manager(
            pg=ProcessGroupGloo(timeout=timedelta(seconds=30)),
            load_state_dict=lambda sd: model.load_state_dict(sd["model"]),
            state_dict=lambda: {"model": model.state_dict()},
            min_replica_size=WORLD,
            use_async_quorum=False,
            rank=0,
            world_size=1,
            store_addr="127.0.0.1",
            store_port=store_ports[rank],
            lighthouse_addr=lh_addr,
            replica_id=f"replica_{rank}",
            init_sync=False,
            timeout=timedelta(seconds=30),
            quorum_timeout=timedelta(seconds=30),
            connect_timeout=timedelta(seconds=30),
        )

    with DiLoCo(
        manager,
        [model],
        inner,
        outer,
        sync_every=SYNC_EVERY,
        should_quantize=False,
    ):
        for step in range(1, STEPS + 1):
            inner.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            inner.step()
            lines.append(
                f"rank{rank} after inner step {step}: loss={loss.item():.10f} "
                f"manager_step={manager.current_step()} "
                f"W hex={hexbits(model.weight)} b hex={hexbits(model.bias)}"
            )

    for n, p in model.named_parameters():
        lines.append(f"rank{rank} final {n} = {p.data}")
        lines.append(f"rank{rank} final {n} hex = {hexbits(p)}")
    q.put((rank, lines))

    if mode == "fake":
        dist.destroy_process_group()
    else:
        manager.shutdown(wait=False)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "fake"
    assert mode in ("fake", "real")
    import torchft

    print(f"mode={mode} torch={torch.__version__} torchft={getattr(torchft, '__version__', 'n/a')}")
    lh = None
    lh_addr = ""
    if mode == "real":
        from torchft._torchft import LighthouseServer

        lh = LighthouseServer(bind="[::]:0", min_replicas=WORLD, join_timeout_ms=10000)
        lh_addr = lh.address()
    port = free_port()
    store_ports = [free_port(), free_port()]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, mode, port, lh_addr, store_ports, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    import queue
    import time

    results: dict[int, list[str]] = {}
    deadline = time.time() + 300
    while len(results) < WORLD:
        try:
            r, lines = q.get(timeout=1)
            results[r] = lines
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.time() > deadline:
                for p in procs:
                    p.kill()
                raise SystemExit(f"worker failed: exitcodes={[p.exitcode for p in procs]}") from None
    for p in procs:
        p.join()
        assert p.exitcode == 0, p.exitcode
    for r in range(WORLD):
        print("\n".join(results[r]))
    if lh is not None:
        lh.shutdown()


if __name__ == "__main__":
    main()

"""The control: tests/exit_script.py without dlion. Its aborts at exit are torch's own.

    python exit_control.py allreduce|plain|attach return|destroy|gather

``allreduce``: the plainest Gloo script, 12 all-reduces of one tensor and nothing else (no
optimizer). ``plain`` and ``attach``: exit_script.py's model and steps with torch.optim.SGD,
the gradients all-reduced by hand or by DDP. The endings are exit_script.py's."""

import sys

import torch
import torch.distributed as dist
from exit_common import runloops
from torch.nn.parallel import DistributedDataParallel as DDP

mode, ending = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
torch.manual_seed(0)
if mode == "allreduce":
    loss = torch.ones(1000)
    for _ in range(12):
        dist.all_reduce(loss)
else:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    net: torch.nn.Module = model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if mode == "attach":
        net = DDP(model)
    for _ in range(12):
        loss = net(torch.randn(16, 64)).pow(2).sum()
        loss.backward()
        if mode == "plain":
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
if ending == "gather":
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.sum().item())
if ending in ("destroy", "gather"):
    dist.destroy_process_group()
    print(f"runloops after destroy_process_group: {runloops()}", flush=True)

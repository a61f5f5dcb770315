"""A user's DistributedLion script, as issue 17 found aborting at exit: Gloo, 12 steps, with
(``attach``) or without (``plain``) DDP. tests/exit_control.py is the same script without dlion.

    python exit_script.py plain|attach return|destroy|gather

The ending: ``return`` (the script just ends, as most do), ``destroy`` (destroy_process_group()
after the last step), ``gather`` (all_gather_object, then destroy_process_group(): how
PyTorch's documentation ends a script). After destroy_process_group() the script prints how
many of Gloo's worker threads it left alive (exit_common.runloops)."""

import sys

import torch
import torch.distributed as dist
from exit_common import runloops
from torch.nn.parallel import DistributedDataParallel as DDP

import dlion

mode, ending = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
net: torch.nn.Module = model
opt = dlion.DistributedLion(model.parameters(), lr=1e-3, backend="sharded")
if mode == "attach":
    net = DDP(model)
    dlion.attach(net, opt)
for _ in range(12):
    loss = net(torch.randn(16, 64)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
if ending == "gather":
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss.item())
if ending in ("destroy", "gather"):
    dist.destroy_process_group()
    print(f"runloops after destroy_process_group: {runloops()}", flush=True)

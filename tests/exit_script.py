"""A user's script under torchrun, as issue 17 found aborting at exit: DistributedLion on Gloo,
12 steps, with (``attach``) or without (``plain``) DDP. It ends the way user scripts end: by
returning, with no os._exit and no destroy_process_group."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dlion

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
net: torch.nn.Module = model
opt = dlion.DistributedLion(model.parameters(), lr=1e-3, backend="sharded")
if sys.argv[1] == "attach":
    net = DDP(model)
    dlion.attach(net, opt)
for _ in range(12):
    net(torch.randn(16, 64)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()

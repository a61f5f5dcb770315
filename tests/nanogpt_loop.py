"""nanoGPT's train.py loop, shortened, with the lines a user changes for dlion marked `# dlion`.

    torchrun --standalone --nproc-per-node 2 tests/nanogpt_loop.py OUT_DIR MAX_ITERS [RESUME]

The loop's shape is nanoGPT's: a process group first, each rank seeded 1337 + rank, the
optimizer built before DDP wraps the model, gradient accumulation by toggling
``require_backward_grad_sync``, a GradScaler (disabled off fp16, as there), ``grad_clip = 1.0``
with ``scaler.unscale_`` before ``clip_grad_norm_``, and a checkpoint saved by rank 0 and
loaded by every rank. Writes OUT_DIR/final-rank{r}.pt (the parameters) when it ends.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dlion  # dlion
from dlion.train.model import ByteGPT, ModelConfig

out_dir, max_iters = sys.argv[1], int(sys.argv[2])
init_from = "resume" if len(sys.argv) > 3 else "scratch"
gradient_accumulation_steps, batch_size, block_size, grad_clip = 2, 4, 16, 1.0
ckpt_path = os.path.join(out_dir, "ckpt.pt")

dist.init_process_group("gloo")
ddp_rank = dist.get_rank()
master_process = ddp_rank == 0
torch.manual_seed(1337 + ddp_rank)  # nanoGPT seeds every rank differently


def get_batch(it: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    # nanoGPT samples random windows of its data; here a stream fixed by (rank, iteration).
    gen = torch.Generator().manual_seed(10_000 * ddp_rank + 100 * it + micro)
    data = torch.randint(0, 256, (batch_size, block_size + 1), generator=gen)
    return data[:, :-1], data[:, 1:]


model = ByteGPT(ModelConfig(context=block_size, d_model=32, layers=2, heads=2), seed=1337 + ddp_rank)
iter_num, checkpoint = 0, None
if init_from == "resume":
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    iter_num = checkpoint["iter_num"]
scaler = torch.amp.GradScaler("cpu", enabled=False)  # nanoGPT: enabled only for float16
# nanoGPT's configure_optimizers builds AdamW; dlion: DistributedLion, with the process group
# there, makes every rank hold rank 0's weights before the first forward.
optimizer = dlion.DistributedLion(model.parameters(), lr=1e-3, weight_decay=0.1)  # dlion
if checkpoint is not None:
    optimizer.load_state_dict(checkpoint["optimizer"])  # every rank takes its own entry
model = DDP(model)
attached = dlion.attach(model, optimizer)  # dlion: DDP sends nothing; the vote does
raw_model = model.module

while iter_num < max_iters:
    for micro_step in range(gradient_accumulation_steps):
        model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        x, y = get_batch(iter_num, micro_step)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        scaler.scale(loss / gradient_accumulation_steps).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    if iter_num == max_iters and init_from == "scratch":
        state = dlion.gather_optimizer_state(optimizer)  # dlion: on every rank; None but on rank 0
        if master_process:
            checkpoint = {"model": raw_model.state_dict(), "optimizer": state, "iter_num": iter_num}
            torch.save(checkpoint, ckpt_path)
        dist.barrier()

final = {"params": [p.detach() for p in raw_model.parameters()], "vote_in_step": attached.vote_in_step}
torch.save(final, os.path.join(out_dir, f"final-rank{ddp_rank}.pt"))

"""One rank of a framework run, under torchrun: a tiny GPT-2 (transformers' config classes, no
download) on byte windows of Python's standard library, trained by DistributedLion attached
to the framework's DDP model, or by plain fp32 DDP + AdamW for the reference.

    torchrun --standalone --nproc-per-node 2 tests/frameworks_job.py FRAMEWORK OUT_DIR

FRAMEWORK: hf (Trainer + dlion.integrations.hf), lightning (dlion.integrations.lightning),
accelerate (dlion.attach(accelerator.prepare(model), opt)) or ddp-fp32 (no dlion). Each rank
writes OUT_DIR/rank<r>.json: losses, a parameter hash, the ledger, and on rank 0 the loopback
interface's bytes (this network namespace's wire) at steps FROM and TO, read after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEPS, FROM, TO = 16, 4, 16
BATCH, CONTEXT = 8, 32


def model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config)


class Windows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        from dlion.train.data import CorpusConfig, load_corpus

        self.data = load_corpus(CorpusConfig(max_bytes=200_000)).train.long()

    def __len__(self) -> int:
        return (self.data.numel() - 1) // CONTEXT

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.data[i * CONTEXT : (i + 1) * CONTEXT]
        return {"input_ids": x, "labels": x}


class Probe:
    """Losses, and the namespace's loopback bytes at steps FROM and TO (all ranks in step)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lo: dict[int, int] = {}

    def step_done(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if step in (FROM, TO):
            dist.barrier()
            self.lo[step] = lo_tx_bytes()


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    raise RuntimeError("no lo in /proc/net/dev")


def local_steps(params: Any) -> Any:
    """dlion-local for the *-local jobs: 16 steps are 3 rounds of 5 and a partial one."""
    import dlion

    return dlion.build_optimizer(
        "dlion-local", params, lr=3e-3, weight_decay=0.1, local_steps=5, outer_lr=2.5
    )


def run_hf(probe: Probe, out: Path, *, local: bool = False) -> tuple[Any, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dlion.integrations.hf import DistributedLionCallback, create_optimizer

    class Steps(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                probe.step_done(state.global_step, float(logs["loss"]))

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3,
        weight_decay=0.1, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no",
        ddp_backend="gloo", dataloader_num_workers=0, seed=0, disable_tqdm=True,
        ddp_find_unused_parameters=False,  # else DDP all-reduces a map of unused parameters every step
    )  # fmt: skip
    net = model()
    trainer = Trainer(net, args, train_dataset=Windows(), callbacks=[DistributedLionCallback(), Steps()])
    trainer.optimizer = (
        local_steps(net.parameters()) if local else create_optimizer(trainer, backend="sharded")
    )
    trainer.train()
    return net, trainer.optimizer


def lightning_module(probe: Probe | None, *, local: bool = False) -> Any:
    """The tiny GPT-2 as a LightningModule trained by DistributedLion (steps reported to ``probe``)."""
    import lightning.pytorch as pl

    import dlion

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model()

        def training_step(self, batch: dict[str, torch.Tensor], i: int) -> torch.Tensor:
            return self.net(**batch).loss

        def on_train_batch_end(self, outputs: Any, batch: Any, i: int) -> None:
            if probe is not None:
                probe.step_done(self.trainer.global_step, float(outputs["loss"]))

        def configure_optimizers(self) -> Any:
            if local:
                return local_steps(self.parameters())
            return dlion.DistributedLion(self.parameters(), lr=3e-3, weight_decay=0.1, backend="sharded")

    return Tiny()


def run_lightning(probe: Probe, out: Path, *, local: bool = False) -> tuple[Any, Any]:
    import lightning.pytorch as pl

    from dlion.integrations.lightning import DistributedLionCallback

    tiny = lightning_module(probe, local=local)
    loader = torch.utils.data.DataLoader(Windows(), batch_size=BATCH, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, callbacks=[DistributedLionCallback()],
        enable_checkpointing=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(out / "pl"),
    )  # fmt: skip
    trainer.fit(tiny, loader)
    return tiny.net, trainer.optimizers[0]


def run_accelerate(probe: Probe, out: Path, *, dlion_hook: bool = True) -> tuple[Any, Any]:
    from accelerate import Accelerator

    import dlion

    accelerator = Accelerator(cpu=True)
    net = model()
    if dlion_hook:
        opt: Any = dlion.DistributedLion(net.parameters(), lr=3e-3, weight_decay=0.1, backend="sharded")
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(Windows(), batch_size=BATCH, shuffle=True)
    ddp, opt, loader = accelerator.prepare(net, opt, loader)
    if dlion_hook:
        dlion.attach(ddp, opt)
    batches = iter(loader)
    for step in range(1, STEPS + 1):
        loss = ddp(**next(batches)).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        probe.step_done(step, float(loss))
    return net, opt


# ---- resumed from a checkpoint (tests/test_resume.py). FRAMEWORK hf-resume or lightning-resume:
# an uninterrupted run and one resumed from its checkpoint; each rank's json holds both runs'
# parameter hashes and final steps.

RESUME_AT = 3  # the checkpoint's step; both runs end at twice it


def param_digest(net: Any) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()


def run_hf_resume(out: Path) -> dict[str, Any]:
    """The uninterrupted run, which checkpoints at RESUME_AT, then a fresh Trainer resumed from
    that checkpoint; the Trainer restores its RNG state, so dropout stays on."""
    from transformers import Trainer, TrainingArguments

    from dlion.integrations.hf import DistributedLionCallback, create_optimizer

    def train(folder: str, resume: str | None) -> tuple[str, int]:
        args = TrainingArguments(
            output_dir=str(out / folder), per_device_train_batch_size=BATCH, max_steps=2 * RESUME_AT,
            learning_rate=3e-3, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="steps",
            save_steps=RESUME_AT, ddp_backend="gloo", dataloader_num_workers=0, seed=0, disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )  # fmt: skip
        net = model()
        trainer = Trainer(net, args, train_dataset=Windows(), callbacks=[DistributedLionCallback()])
        trainer.optimizer = create_optimizer(trainer, backend="sharded")
        trainer.train(resume_from_checkpoint=resume)
        return param_digest(net), trainer.state.global_step

    whole, whole_steps = train("whole", None)
    resumed, resumed_steps = train("resumed", str(out / "whole" / f"checkpoint-{RESUME_AT}"))
    return {"whole": whole, "resumed": resumed, "steps": [whole_steps, resumed_steps], "resume_at": RESUME_AT}


def run_hf_early(out: Path) -> dict[str, Any]:
    """dlion-local (H = 5) under the Trainer with load_best_model_at_end, evaluated every 3
    steps and stopped by an evaluation in the middle of a round, the way EarlyStoppingCallback
    stops it: once where a checkpoint follows the stopping evaluation (saved every 3 steps,
    stopped at 6) and once where none does (saved every 6, stopped at 9). Each records the
    final parameters and the best checkpoint's, read back from its file."""
    from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from dlion.integrations.hf import DistributedLionCallback

    class StopAt(TrainerCallback):  # type: ignore[misc]
        def __init__(self, step: int) -> None:
            self.step = step

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            control.should_training_stop = state.global_step >= self.step

    def train(save_steps: int, stop_at: int) -> dict[str, Any]:
        args = TrainingArguments(
            output_dir=str(out / f"save{save_steps}"), per_device_train_batch_size=BATCH,
            per_device_eval_batch_size=BATCH, max_steps=STEPS, learning_rate=3e-3, weight_decay=0.1,
            use_cpu=True, report_to=[], eval_strategy="steps", eval_steps=3, save_strategy="steps",
            save_steps=save_steps, load_best_model_at_end=True, metric_for_best_model="eval_loss",
            ddp_backend="gloo", dataloader_num_workers=0, seed=0, disable_tqdm=True,
            ddp_find_unused_parameters=False,
        )  # fmt: skip
        net, held_out = model(), torch.utils.data.Subset(Windows(), range(4 * BATCH))
        callbacks = [DistributedLionCallback(), StopAt(stop_at)]
        trainer = Trainer(net, args, train_dataset=Windows(), eval_dataset=held_out, callbacks=callbacks)
        trainer.optimizer = opt = local_steps(net.parameters())
        trainer.train()
        best = trainer.state.best_model_checkpoint
        return {
            "params": param_digest(net),
            "best": param_digest(GPT2LMHeadModel.from_pretrained(best)),
            "best_checkpoint": Path(best).name,
            "steps": trainer.state.global_step,
            "rounds": opt.rounds,
        }

    return {"saved_at_stop": train(3, 6), "not_saved_at_stop": train(6, 9)}


def run_lightning_resume(out: Path) -> dict[str, Any]:
    """Two epochs of RESUME_AT steps, checkpointed at each epoch's end, then a fresh Trainer
    fit from the first epoch's checkpoint. Lightning restores no RNG state: no dropout."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from transformers import GPT2Config, GPT2LMHeadModel

    import dlion
    from dlion.integrations.lightning import DistributedLionCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            config = GPT2Config(
                vocab_size=256, n_positions=CONTEXT, n_embd=128, n_layer=2, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            )  # fmt: skip
            self.net = GPT2LMHeadModel(config)

        def training_step(self, batch: dict[str, torch.Tensor], i: int) -> torch.Tensor:
            return self.net(**batch).loss

        def configure_optimizers(self) -> Any:
            return dlion.DistributedLion(self.parameters(), lr=3e-3, weight_decay=0.1, backend="sharded")

    def fit(folder: str, ckpt: str | None) -> tuple[str, int]:
        tiny = Tiny()
        loader = torch.utils.data.DataLoader(Windows(), batch_size=BATCH, shuffle=True)
        saves = ModelCheckpoint(
            dirpath=str(out / folder), filename="{epoch}", every_n_epochs=1, save_top_k=-1
        )
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=RESUME_AT,
            callbacks=[DistributedLionCallback(), saves], logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(out / folder),
        )  # fmt: skip
        trainer.fit(tiny, loader, ckpt_path=ckpt)
        return param_digest(tiny.net), trainer.global_step

    whole, whole_steps = fit("whole", None)
    resumed, resumed_steps = fit("resumed", str(out / "whole" / "epoch=0.ckpt"))
    return {"whole": whole, "resumed": resumed, "steps": [whole_steps, resumed_steps], "resume_at": RESUME_AT}


def run_clip(framework: str, out: Path) -> dict[str, Any]:
    """The framework's own clipping (HF max_grad_norm, Lightning gradient_clip_val) at 0.1 and
    off: the callback passes it through (the vote waits for it, in step()), so the two differ."""
    import lightning.pytorch as pl
    from transformers import Trainer, TrainingArguments

    from dlion.integrations import hf, lightning

    def hf_run(clip: float) -> tuple[str, bool | None]:
        args = TrainingArguments(
            output_dir=str(out / f"hf{clip}"), per_device_train_batch_size=BATCH, max_steps=6,
            learning_rate=3e-3, weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no",
            ddp_backend="gloo", dataloader_num_workers=0, seed=0, disable_tqdm=True,
            ddp_find_unused_parameters=False, max_grad_norm=clip,
        )  # fmt: skip
        net, callback = model(), hf.DistributedLionCallback()
        trainer = Trainer(net, args, train_dataset=Windows(), callbacks=[callback])
        opt = trainer.optimizer = hf.create_optimizer(trainer, backend="sharded")
        trainer.train()
        return param_digest(net), opt.launching.vote_in_step

    def lightning_run(clip: float) -> tuple[str, bool | None]:
        torch.manual_seed(0)
        tiny = lightning_module(None)
        loader = torch.utils.data.DataLoader(Windows(), batch_size=BATCH, shuffle=False)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=6, gradient_clip_val=clip or None,
            callbacks=[lightning.DistributedLionCallback()], enable_checkpointing=False, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out / f"pl{clip}"),
        )  # fmt: skip
        trainer.fit(tiny, loader)
        return param_digest(tiny.net), trainer.optimizers[0].launching.vote_in_step

    run = hf_run if framework == "hf-clip" else lightning_run
    (clipped, clipped_in_step), (free, free_in_step) = run(0.1), run(0.0)
    return {"clipped": clipped, "free": free, "vote_in_step": [clipped_in_step, free_in_step]}


def main() -> None:
    framework, out = sys.argv[1], Path(sys.argv[2])
    if framework in ("hf-resume", "lightning-resume", "hf-clip", "lightning-clip", "hf-early"):
        if framework == "hf-early":
            record = run_hf_early(out)
        elif framework.endswith("-clip"):
            record = run_clip(framework, out)
        else:
            resume = run_hf_resume if framework == "hf-resume" else run_lightning_resume
            record = resume(out)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
        dist.barrier()
        os._exit(0)
    if framework in ("accelerate", "ddp-fp32"):
        dist.init_process_group("gloo")  # Accelerate takes the group torchrun's variables describe
    probe = Probe()
    runs = {
        "hf": run_hf,
        "lightning": run_lightning,
        "accelerate": run_accelerate,
        "hf-local": partial(run_hf, local=True),
        "lightning-local": partial(run_lightning, local=True),
    }
    if framework == "ddp-fp32":
        net, opt = run_accelerate(probe, out, dlion_hook=False)
    else:
        net, opt = runs[framework](probe, out)
    rank = dist.get_rank()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters()))
    inner = getattr(opt, "optimizer", opt)
    ledger = inner.ledger.step_bytes() if hasattr(inner, "ledger") else None
    record = {
        "losses": probe.losses,
        "params": digest.hexdigest(),
        "n_params": sum(p.numel() for p in net.parameters()),
        "step_bytes": ledger,
        "lo": probe.lo,
        "world": dist.get_world_size(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    os._exit(0)  # skip interpreter teardown: nothing left to do


if __name__ == "__main__":
    main()

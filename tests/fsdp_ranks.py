"""What each Gloo rank runs in the FSDP2 tests (tests/test_fsdp.py): a small MLP, sharded with
fully_shard on a 1-D or a 2-D (replicate, shard) CPU mesh, trained with DistributedLion under
dlion.attach; the same model unsharded under the hierarchical backend, the reference the
sharded vote must equal; FSDP2's own switches; DCP checkpoints; the refusals; and the edges
(a non-finite shard, attach twice, stale weights, GradScaler, swapped parameters).

Ranks lie on the mesh as init_device_mesh lays them: rank = replica * S + shard, so the shard
group of a replica is one "node" of the hierarchical reference (procs_per_node = S)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

IN, HIDDEN, OUT = 6, 10, 3  # HIDDEN and OUT rows split unevenly over 3 or 4 shards
STEPS = 4
LR = 0.01


class Checkpointed(torch.nn.Sequential):
    """The Sequential, its whole forward under torch.utils.checkpoint (recomputed in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from torch.utils.checkpoint import checkpoint

        return checkpoint(super().forward, x, use_reentrant=False)  # type: ignore[no-any-return]


def make_model(checkpoint: str | None = None) -> torch.nn.Module:
    """The MLP; ``checkpoint`` "wrapper": each Linear in checkpoint_wrapper (sharded as one),
    "function": the whole forward under torch.utils.checkpoint."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, OUT),
    ]  # fmt: skip
    if checkpoint == "wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        layers = [checkpoint_wrapper(m) if isinstance(m, torch.nn.Linear) else m for m in layers]
    return Checkpointed(*layers) if checkpoint == "function" else torch.nn.Sequential(*layers)


def linear_shapes() -> list[list[tuple[int, ...]]]:
    """The parameter shapes of each Linear of the model, in order: one FSDP group each."""
    return [[tuple(p.shape) for p in m.parameters()] for m in make_model() if isinstance(m, torch.nn.Linear)]


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(5, IN, generator=g), torch.randn(5, OUT, generator=g)


def mesh_of(replicas: int, shards: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    if replicas == 1:
        return init_device_mesh("cpu", (shards,), mesh_dim_names=("shard",))
    return init_device_mesh("cpu", (replicas, shards), mesh_dim_names=("replicate", "shard"))


def shard(model: torch.nn.Module, mesh: Any, **kw: Any) -> torch.nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        inner = getattr(layer, "_orig_mod", layer)  # a layer torch.compile'd before sharding
        if isinstance(inner, torch.nn.Linear | CheckpointWrapper):
            fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean()


def schedule(step: int) -> float:
    """The LambdaLR factor of both the sharded run and its reference."""
    return 1.0 / (1 + step)


COMPILED: list[int] = []  # this rank's graphs torch.compile handed its backend (node counts)


def compiled(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Each layer torch.compile'd (fullgraph) before fully_shard, as torchtitan does: FSDP2's
    hooks stay outside the graphs. (torch.compile of the sharded root, or module.compile()
    after fully_shard, compiles nothing here: the hooks are dynamo-disabled, a graph break.)"""
    from torch._dynamo.backends.registry import lookup_backend

    def counting(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        COMPILED.append(len(gm.graph.nodes))
        return lookup_backend(backend)(gm, inputs)

    return torch.nn.Sequential(*[torch.compile(m, backend=counting, fullgraph=True) for m in model])


def build(
    rank: int, world: int, replicas: int, *, vote: str = "average", tie: str = "random",
    backend: str = "sharded", attach: bool = True, checkpoint: str | None = None, mixed: bool = False,
    reshard: bool | None = None, compile_with: str | None = None,
) -> tuple[torch.nn.Module, Any, Any]:  # fmt: skip
    """(FSDP model, DistributedLion, attachment or None) on a (replicas, world // replicas) mesh."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import dlion

    kw: dict[str, Any] = {} if reshard is None else {"reshard_after_forward": reshard}
    if mixed:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = make_model(checkpoint)
    if compile_with is not None:
        model = compiled(model, compile_with)
    model = shard(model, mesh_of(replicas, world // replicas), **kw)
    opt = dlion.DistributedLion(model.parameters(), lr=LR, vote=vote, tie=tie, backend=backend, seed=3)
    return model, opt, dlion.attach(model, opt) if attach else None


def train_steps(
    model: torch.nn.Module, opt: Any, rank: int, per_node: int, steps: range, *, micro: int = 1,
    clip: float | None = None, sched: Any = None, sync: Callable[[bool], None] | None = None,
) -> None:  # fmt: skip
    """Each step ``micro`` micro-batches of the node's batch, this rank's share of each; ``sync``
    (FSDP's set_requires_gradient_sync) off on all but the last."""
    node, local = rank // per_node, rank % per_node
    for step in steps:
        for j in range(micro):
            if sync is not None:
                sync(j == micro - 1)
            x, y = batch(node, step * micro + j)
            loss_of(model, x.tensor_split(per_node)[local], y.tensor_split(per_node)[local]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def records_of(opt: Any) -> list[list[tuple[str, str, str, int, int]]]:
    return [[(r.name, r.op, r.scope, r.sent.bits, r.received.bits) for r in s] for s in opt.ledger.steps]


def summary(model: torch.nn.Module, opt: Any, caught: Sequence[Any] = ()) -> dict[str, Any]:
    """Every rank's full parameters, its local shards and momenta, the ledger's records by step."""
    params = list(model.parameters())
    return {
        "params": [p.full_tensor().detach().clone() for p in params],
        "local": [p.to_local().detach().clone() for p in params],
        "momenta": [opt.state[p]["exp_avg"].clone() for p in params],
        "records": records_of(opt),
        "warnings": [str(w.message) for w in caught],
        "counters": (opt.steps_taken, opt.skipped_steps),
        "lrs": [g["lr"] for g in opt.param_groups],
        "compiled": list(COMPILED),
    }


def train_sharded(
    rank: int, world: int, replicas: int, steps: int = STEPS, micro: int = 1, clip: float | None = None,
    lr_schedule: bool = False, **build_kw: Any,
) -> dict[str, Any]:  # fmt: skip
    """HSDP (or FSDP when replicas == 1) with DistributedLion: ``summary``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, _ = build(rank, world, replicas, **build_kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if lr_schedule else None
        sync = model.set_requires_gradient_sync if micro > 1 else None  # FSDPModule's
        per_node = world // replicas
        train_steps(model, opt, rank, per_node, range(steps), micro=micro, clip=clip, sched=sched, sync=sync)
    return summary(model, opt, caught)


def several(rank: int, world: int, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """train_sharded once per job, in one world (each on a mesh of its own)."""
    return [train_sharded(rank, world, **job) for job in jobs]


def train_hierarchical(
    rank: int, world: int, per_node: int, vote: str = "average", tie: str = "random", steps: int = STEPS,
    micro: int = 1, lr_schedule: bool = False,
) -> list[torch.Tensor]:  # fmt: skip
    """The reference: the unsharded model, each rank the same share of its node's batch,
    backend "hierarchical" with the node = the shard group; micro-batches accumulate in p.grad."""
    import dlion

    model = make_model()
    opt = dlion.DistributedLion(
        model.parameters(), lr=LR, vote=vote, tie=tie, backend="hierarchical", procs_per_node=per_node, seed=3
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if lr_schedule else None
    train_steps(model, opt, rank, per_node, range(steps), micro=micro, sched=sched)
    return [p.detach().clone() for p in model.parameters()]


def hierarchical_runs(rank: int, world: int, jobs: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
    return [train_hierarchical(rank, world, **job) for job in jobs]


def lion_reference(shards: int, steps: int = STEPS) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """1-D FSDP's math on one process: dlion.Lion on the unsharded model, fed the mean of the
    S = 2 ranks' gradients, (g0 + g1) / 2, as FSDP's fp32 reduce-scatter forms it (ReduceOp.AVG
    of two terms: one float whatever the order). (params, momenta)."""
    import dlion

    assert shards == 2
    model = make_model()
    opt = dlion.Lion(model.parameters(), lr=LR)
    params = list(model.parameters())
    for step in range(steps):
        x, y = batch(0, step)
        per_rank = []
        for s in range(shards):
            loss_of(model, x.tensor_split(shards)[s], y.tensor_split(shards)[s]).backward()
            per_rank.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
            opt.zero_grad()
        for i, p in enumerate(params):
            p.grad = (per_rank[0][i] + per_rank[1][i]) / 2
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params], [opt.state[p]["exp_avg"].clone() for p in params]


def world_rank() -> int:
    return dist.get_rank()


# ---- FSDP2's own switches, measured (test_fsdp.test_fsdp2_switches_against_attach)


def _backward_grads(model: torch.nn.Module, rank: int, keep: bool = False) -> list[torch.Tensor | None]:
    """One backward of this rank's share of its node's batch (2x2 mesh): each p.grad's local
    shard (None: no gradient); the gradients then cleared, unless ``keep``."""
    x, y = batch(rank // 2, 0)
    loss_of(model, x.tensor_split(2)[rank % 2], y.tensor_split(2)[rank % 2]).backward()
    out = [None if p.grad is None else p.grad.to_local().clone() for p in model.parameters()]
    if not keep:
        model.zero_grad(set_to_none=True)
    return out


def switches(rank: int, world: int) -> dict[str, Any]:
    """On a 2x2 HSDP model: FSDP2's set_requires_all_reduce(False), its all-reduce hook, then
    dlion.attach and detach; the gradients each leaves in p.grad, and the one step's records
    (the attached backward's FSDP collectives, the detached one's, the vote's)."""
    from torch.distributed.fsdp import FSDPModule

    import dlion

    model = shard(make_model(), mesh_of(2, 2))
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    out: dict[str, Any] = {"plain": _backward_grads(model, rank)}
    model.set_requires_all_reduce(False)  # type: ignore[operator]
    out["no_all_reduce"] = _backward_grads(model, rank)
    model.set_requires_all_reduce(True)  # type: ignore[operator]
    hooked: list[torch.Tensor] = []
    for m in fsdp:
        m.set_all_reduce_hook(hooked.append)
    out["hooked_grads"] = _backward_grads(model, rank)
    out["hooked"] = [t.clone() for t in hooked]
    for m in fsdp:
        m.set_all_reduce_hook(None)  # type: ignore[arg-type]
    opt = dlion.DistributedLion(model.parameters(), lr=LR, vote="average", seed=3)
    attachment = dlion.attach(model, opt)
    out["attached"] = _backward_grads(model, rank)
    attachment.detach()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # detached: NOT_ATTACHED (and the averaged-gradient guard)
        out["detached"] = _backward_grads(model, rank, keep=True)
        opt.step()
    out["records"] = records_of(opt)
    return out


# ---- DCP checkpoints (test_fsdp.test_dcp_*)


def _options(flatten: bool) -> Any:
    """DCP's StateDictOptions: torchtitan's flatten_optimizer_state_dict=True, or the default."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True) if flatten else None


def _dcp_save(model: torch.nn.Module, opt: Any, path: str, flatten: bool = False) -> dict[str, Any]:
    """dcp.save of the model's and the optimizer's state dicts; the optimizer's, as saved."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, opt, options=_options(flatten))
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=path)
    return optim  # type: ignore[no-any-return]


def _dcp_load(model: torch.nn.Module, opt: Any, path: str, flatten: bool = False) -> dict[str, Any]:
    """Load into a fresh model and optimizer, as torchtitan does; what each stage left."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    options = _options(flatten)
    before = [p.full_tensor().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optim = sd.get_optimizer_state_dict(model, opt, options=options)
        state = {"model": sd.get_model_state_dict(model), "optim": optim}
    # DCP's _init_optim_state ran one step with zero gradients and lr 0 on the fresh optimizer
    seen = {
        "init_warnings": [str(w.message) for w in caught],
        "init_changed": [
            not torch.equal(a, p.full_tensor()) for a, p in zip(before, model.parameters(), strict=True)
        ],
        "init_counters": (opt.steps_taken, opt.skipped_steps),
        "init_lrs": [g["lr"] for g in opt.param_groups],
    }
    dcp.load(state, checkpoint_id=path)
    sd.set_model_state_dict(model, state["model"])
    sd.set_optimizer_state_dict(model, opt, state["optim"], options=options)
    seen["loaded"] = [p.full_tensor().clone() for p in model.parameters()]
    seen["loaded_momenta"] = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    seen["counters"] = (opt.steps_taken, opt.skipped_steps)
    return seen


def dcp_resume(rank: int, world: int, replicas: int, k: int, path: str) -> dict[str, Any]:
    """2k steps unbroken; k steps, a DCP save, a fresh model and optimizer loading it, k more."""
    per_node = world // replicas
    model, opt, _ = build(rank, world, replicas)
    train_steps(model, opt, rank, per_node, range(2 * k))
    out = {"whole": summary(model, opt)}
    model, opt, _ = build(rank, world, replicas)
    train_steps(model, opt, rank, per_node, range(k))
    out["saved"] = summary(model, opt)
    _dcp_save(model, opt, path)
    model, opt, _ = build(rank, world, replicas)
    out["load"] = _dcp_load(model, opt, path)
    train_steps(model, opt, rank, per_node, range(k, 2 * k))
    out["resumed"] = summary(model, opt)
    return out


def dcp_save(rank: int, world: int, replicas: int, k: int, path: str) -> dict[str, Any]:
    model, opt, _ = build(rank, world, replicas)
    train_steps(model, opt, rank, world // replicas, range(k))
    _dcp_save(model, opt, path)
    return summary(model, opt)


def dcp_load(rank: int, world: int, replicas: int, k: int, path: str) -> dict[str, Any]:
    """A fresh model on another mesh loads ``path``, then trains k more steps."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        model, opt, _ = build(rank, world, replicas)
        out = {"load": _dcp_load(model, opt, path)}
        train_steps(model, opt, rank, world // replicas, range(k, 2 * k))
    return out | summary(model, opt)


def dcp_load_refused(rank: int, world: int, replicas: int, path: str) -> dict[str, str]:
    """Load a checkpoint saved with another number of replicas: DCP's error; and the
    optimizer's own when a state of 2 replicas' rows, or of another parameter's shape, reaches
    load_state_dict."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.tensor import Shard, distribute_tensor

    model, opt, _ = build(rank, world, replicas)
    out = {}
    try:
        _dcp_load(model, opt, path)
    except CheckpointException as err:  # a BaseException, raised on every rank
        out["dcp"] = f"{type(err).__name__}: {err}"
    mesh = next(iter(model.parameters())).device_mesh
    for case, extra in (("load_state_dict", (2, 0)), ("other_model", (replicas, 1))):
        sd = opt.state_dict()
        for st, p in zip(sd["state"].values(), model.parameters(), strict=True):
            shape = (extra[0], p.shape[0] + extra[1], *p.shape[1:])
            st["exp_avg"] = distribute_tensor(torch.zeros(shape), mesh, [Shard(0), Shard(1)])
        try:
            opt.load_state_dict(sd)
        except ValueError as err:
            out[case] = f"{type(err).__name__}: {err}"
    return out


# ---- refusals (test_fsdp.test_bad_layouts_and_settings_are_named)


def _error(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def refusals(rank: int, world: int) -> dict[str, str]:
    """Each bad layout or setting on a 2x2 mesh (4 ranks), the error it raised on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import dlion

    mesh = mesh_of(2, 2)

    def param(placements: list[Any], on: Any = mesh) -> torch.nn.Parameter:
        return torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), on, placements))

    def lion(params: Any, **kw: Any) -> Any:
        return dlion.DistributedLion(params, lr=LR, **kw)

    hsdp = [Replicate(), Shard(0)]
    plain = make_model()
    early = make_model()  # an optimizer built before fully_shard holds these tensors
    early_opt = lion(early.parameters(), process_group=dist.group.WORLD)
    shard(early, mesh)
    cube = init_device_mesh("cpu", (1, 2, 2), mesh_dim_names=("a", "b", "c"))
    return {
        "mixed": _error(lambda: lion([param(hsdp), torch.nn.Parameter(torch.ones(3))])),
        "shard1": _error(lambda: lion([param([Replicate(), Shard(1)])])),
        "mesh3d": _error(lambda: lion([param([Replicate(), Replicate(), Shard(0)], cube)])),
        "both_sharded": _error(lambda: lion([param([Shard(0), Shard(0)])])),
        "unsharded_model": _error(lambda: dlion.attach(plain, lion(plain.parameters()))),
        "early_optimizer": _error(lambda: dlion.attach(early, early_opt)),
        "hierarchical": _error(lambda: lion([param(hsdp)], backend="hierarchical", procs_per_node=2)),
        "overlap": _error(lambda: lion([param(hsdp)], overlap=True)),
        "process_group": _error(lambda: lion([param(hsdp)], process_group=dist.group.WORLD)),
        "transport": _error(lambda: lion([param(hsdp)], transport="mpi")),
    }


def coin_seeds(rank: int, world: int, replicas: int) -> tuple[int, int]:
    """(this rank's shard index, the seed its coins are keyed by) on an R x S mesh."""
    from dlion.worker.core.sharding import sharding_of

    model = shard(make_model(), mesh_of(replicas, world // replicas))
    params = list(model.parameters())
    sharding = sharding_of("test", params, [str(i) for i in range(len(params))])
    return rank % (world // replicas), sharding.seed_of(3)


# ---- edges: one bad shard, attach's undoing, the refused savers, swapped params (test_fsdp)

BAD_STEP = 2  # the step whose gradient turns non-finite on one rank


def calls(rank: int, world: int, jobs: list[tuple[Callable[..., Any], dict[str, Any]]]) -> list[Any]:
    """Each (rank function, its keywords) in turn, in one world."""
    return [fn(rank, world, **kw) for fn, kw in jobs]


def shard_rooted(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """fully_shard every Linear but the last, whose parameters the root's own FSDP group holds
    (FSDP does not reshard the root's after forward)."""
    from torch.distributed.fsdp import fully_shard

    for layer in [m for m in model if isinstance(m, torch.nn.Linear)][:-1]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def nonfinite(rank: int, world: int, replicas: int, policy: str, bad_rank: int = 0) -> dict[str, Any]:
    """Under attach, steps 0 to BAD_STEP - 1, then at BAD_STEP an Inf in one element of rank
    ``bad_rank``'s local shard of the first gradient, after backward: the error step() raised
    (then nothing more), or the skipped step's effect on this rank's shards and counters, and
    two more steps' ``summary``. Waits are bounded (DistributedLion's timeout)."""
    from datetime import timedelta

    import dlion

    per_node = world // replicas
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")  # NO_REPLICAS on a 1-D mesh
        model = shard(make_model(), mesh_of(replicas, per_node))
        opt = dlion.DistributedLion(
            model.parameters(), lr=LR, seed=3, nonfinite=policy, timeout=timedelta(seconds=20)
        )
    dlion.attach(model, opt)
    train_steps(model, opt, rank, per_node, range(BAD_STEP))
    x, y = batch(rank // per_node, BAD_STEP)
    loss_of(
        model, x.tensor_split(per_node)[rank % per_node], y.tensor_split(per_node)[rank % per_node]
    ).backward()
    params = list(model.parameters())
    if rank == bad_rank:
        params[0].grad.to_local()[0, 0] = float("inf")  # type: ignore[union-attr]
    local = [p.to_local().clone() for p in params]
    momenta = [opt.state[p]["exp_avg"].clone() for p in params]
    try:
        opt.step()
    except dlion.NonFiniteGradientError as err:
        return {"error": f"{type(err).__name__}: {err}"}
    out: dict[str, Any] = {"error": None, "counters_at_skip": (opt.steps_taken, opt.skipped_steps)}
    out["unchanged"] = same(local, [p.to_local() for p in params])
    out["momenta_unchanged"] = same(momenta, [opt.state[p]["exp_avg"] for p in params])
    opt.zero_grad()
    train_steps(model, opt, rank, per_node, range(BAD_STEP + 1, STEPS + 1))
    return out | summary(model, opt)


def same(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _fsdp_groups(model: torch.nn.Module) -> list[Any]:
    """FSDP2's parameter groups of every FSDP module of ``model``, root first."""
    from torch.distributed.fsdp import FSDPModule

    from dlion.integrations.fsdp import _param_groups

    return [g for m in model.modules() if isinstance(m, FSDPModule) for g in _param_groups(m)]


def _described(group: Any) -> dict[str, str]:
    """The type of what attach swaps in one FSDP parameter group (None: 'NoneType')."""
    from dlion.integrations.fsdp import SWAPPED

    return {name: type(getattr(group, name)).__name__ for name in SWAPPED}


def attach_twice(rank: int, world: int) -> dict[str, Any]:
    """A 2x2 model whose root holds the last Linear (FSDP's root group): attach, then attach
    again with the same optimizer and with a second DistributedLion (refused); a step under
    the first attachment; detach; then a forward of it and of a twin never attached. What
    attach swaps, before, under, and after detach, against the twin's."""
    import dlion
    from dlion.integrations.fsdp import SWAPPED, _Counted

    mesh = mesh_of(2, 2)
    model, twin = shard_rooted(make_model(), mesh), shard_rooted(make_model(), mesh)
    groups = _fsdp_groups(model)
    before = [{name: getattr(g, name) for name in SWAPPED} for g in groups]
    opt = dlion.DistributedLion(model.parameters(), lr=LR, seed=3)
    attachment = dlion.attach(model, opt)
    out: dict[str, Any] = {"same_optimizer": _error(lambda: dlion.attach(model, opt))}
    second = dlion.DistributedLion(model.parameters(), lr=LR, seed=3)
    out["second_optimizer"] = _error(lambda: dlion.attach(model, second))
    out["second_attached"] = second.sharded_attached
    out["attached"] = [_described(g) for g in groups]
    train_steps(model, opt, rank, 2, range(1))
    out["counted"] = [x[0] for x in records_of(opt)[0] if x[2] == "node"]
    attachment.detach()
    x, _ = batch(rank // 2, 1)
    with torch.no_grad():
        model(x.tensor_split(2)[rank % 2])
        twin(x.tensor_split(2)[rank % 2])
    out["detached"] = [_described(g) for g in groups]
    out["twin"] = [_described(g) for g in _fsdp_groups(twin)]
    out["restored"] = [  # FSDP's own objects again, or what FSDP itself set since (root: None)
        {n: getattr(g, n) is was[n] for n in SWAPPED} for g, was in zip(groups, before, strict=True)
    ]
    out["root_post_forward"] = [repr(g.post_forward_mesh_info) for g in (groups[0], _fsdp_groups(twin)[0])]
    out["counted_after"] = [isinstance(getattr(g, n), _Counted) for g in groups for n in SWAPPED[2:]]
    return out


def stale_weights(rank: int, world: int, rooted: bool = False) -> dict[str, torch.Tensor]:
    """2x2 under attach: forward and backward, a torch.no_grad() forward, step(), a no_grad
    forward: its output, and that of an unsharded copy of the model built from the
    parameters' full_tensor() after the step (the same input)."""
    import dlion

    model = (shard_rooted if rooted else shard)(make_model(), mesh_of(2, 2))
    params = list(model.parameters())  # the DTensors (the root's are swapped while unsharded)
    opt = dlion.DistributedLion(params, lr=LR, seed=3)
    dlion.attach(model, opt)
    x, y = batch(rank // 2, 0)
    x, y = x.tensor_split(2)[rank % 2], y.tensor_split(2)[rank % 2]
    loss_of(model, x, y).backward()
    with torch.no_grad():
        model(x)
    opt.step()
    with torch.no_grad():
        got = model(x)
        copy = make_model()
        for p, q in zip(copy.parameters(), params, strict=True):
            p.copy_(q.full_tensor())
        return {"sharded": got, "unsharded": copy(x)}


def grad_scaler(rank: int, world: int) -> dict[str, Any]:
    """torch.amp.GradScaler("cpu") driving a sharded DistributedLion (2x2, attached):
    scaler.step(opt), and scaler.unscale_(opt) then scaler.step(opt); what each raised, and
    whether a parameter moved."""
    model, opt, _ = build(rank, world, 2)
    before = [p.to_local().clone() for p in model.parameters()]
    out: dict[str, Any] = {}
    for case in ("step", "unscale_step"):
        scaler = torch.amp.GradScaler("cpu")
        out["enabled"] = scaler.is_enabled()
        x, y = batch(rank // 2, 0)
        scaler.scale(loss_of(model, x.tensor_split(2)[rank % 2], y.tensor_split(2)[rank % 2])).backward()
        if case == "unscale_step":
            scaler.unscale_(opt)
        out[case] = _error(lambda s=scaler: s.step(opt))  # type: ignore[misc]
        opt.zero_grad()
    out["moved"] = not same(before, [p.to_local() for p in model.parameters()])
    return out


def savers_refused(rank: int, world: int, path: str) -> dict[str, Any]:
    """dlion's per-rank files and gathered state on a sharded optimizer (2x2, one step in):
    the errors, and whether anything was written."""
    import os

    import dlion

    model, opt, _ = build(rank, world, 2)
    train_steps(model, opt, rank, 2, range(1))
    return {
        "save": _error(lambda: dlion.save_optimizer_state(opt, path)),
        "gather": _error(lambda: dlion.gather_optimizer_state(opt)),
        "written": os.path.exists(path),
    }


def dcp_flattened(rank: int, world: int, k: int, path: str) -> dict[str, Any]:
    """DCP through StateDictOptions(flatten_optimizer_state_dict=True), as torchtitan saves:
    k steps, save, a fresh model and optimizer (attached) loading it, k more (2x2)."""
    model, opt, _ = build(rank, world, 2)
    train_steps(model, opt, rank, 2, range(k))
    saved = _dcp_save(model, opt, path, flatten=True)
    out = {"saved_keys": sorted(saved), "saved_counters": {n: v for n, v in saved.items() if "dlion" in n}}
    model, opt, _ = build(rank, world, 2)
    out["load"] = _dcp_load(model, opt, path, flatten=True)
    train_steps(model, opt, rank, 2, range(k, 2 * k))
    return out | summary(model, opt)


def swapped_in(rank: int, world: int) -> dict[str, Any]:
    """Accelerate's FSDP2 prepare: DistributedLion built over the plain model's parameters,
    then fully_shard (2x2), then each param group's "params" replaced by the model's DTensors
    in the same order; state_dict() right then (before attach or any step); attach and train."""
    import dlion

    model = make_model()
    opt = dlion.DistributedLion(model.parameters(), lr=LR, vote="average", backend="sharded", seed=3)
    shard(model, mesh_of(2, 2))
    dtensors = iter(model.parameters())
    for group in opt.param_groups:
        group["params"] = [next(dtensors) for _ in group["params"]]
    sd = opt.state_dict()
    out = {"keys": sorted(sd), "group_counters": [g.get("dlion") for g in sd["param_groups"]]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dlion.attach(model, opt)
        train_steps(model, opt, rank, 2, range(STEPS))
    return out | summary(model, opt, caught)


def torchrun_1d(rank: int, world: int, jobs: list[tuple[Callable[..., Any], dict[str, Any]]]) -> list[Any]:
    """``calls`` with the environment torchrun gives a rank (WORLD_SIZE, RANK) set first."""
    import os

    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(world), str(rank)
    return [os.environ["WORLD_SIZE"], *calls(rank, world, jobs)]

"""Compare training runs: ``report.json`` files in, a Markdown table, plots and a summary out.

Every launcher (``dlion train``, torchrun, mpiexec, Ray, the emulated cluster) writes the same
report (dlion.train.report), so one reader serves them all. Runs are grouped by their
configuration with the seed left out: runs that differ only in seed are one row, their final
validation loss given as the mean and the min-max range over seeds (min-max rather than a
standard deviation, which says little at 2 or 3 seeds; summary.json holds both).

Bytes are rank 0's ledger, the only rank whose per-step bytes the report keeps (with
``--backend server`` on rank 0, that rank is also the server). Time on the plots is training
time, the sum of step times, without setup or validation: evaluation costs every optimizer
the same and is not part of what is being compared.

    dlion report RUN_DIR... [--out runs/report]

A directory argument is a run (it holds report.json) or a folder of runs (every report.json
below it). Writes OUT/report.md, OUT/summary.json and the PNG plots of dlion.report.plots.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from dlion.checks import check_number
from dlion.worker.catalogue import CATALOGUE

REPORT = "report.json"
DEFAULT_OUT = Path("runs/report")
# Keys a report must have to be read; the rest are optional (older reports lack some).
REQUIRED = ("config", "val_loss", "final_val_loss", "step_bytes", "ledger", "step_time_s", "wall_time_s")
LEDGER_KEYS = ("bytes_sent", "bits_per_param_up", "bits_per_param_down")
# Config fields that do not change what is trained, so runs differing in them are pooled.
RUN_LOCAL = frozenset(
    ("seed", "out", "overwrite", "checkpoint_dir", "checkpoint_every", "timeout_s", "platform")
)
RUN_LOCAL |= {"torch_version", "dlion_version", "python_version"}
# Only these optimizers run a vote or a gather whose place the backend picks.
BACKEND_USERS = frozenset(e.name for e in CATALOGUE.values() if e.backends)


class ReportError(ValueError):
    """A path that is not a readable dlion report; the message names the path."""


@dataclass(frozen=True)
class Run:
    """One report, reduced to what the comparison needs."""

    path: Path
    task: str  # what was trained: "bytes" (the language model) or "digits" (a classifier)
    optimizer: str
    backend: str  # "-" where the optimizer does not use one (all-reduce, single process)
    world_size: int
    seed: int
    settings: tuple[tuple[str, str], ...]  # the rest of the configuration, as JSON text
    val_loss: tuple[tuple[int, float], ...]
    final_val_loss: float
    step_bytes_sent: tuple[int, ...]  # rank 0's, per step from step 1 (a resumed run restores them)
    step_time_s: tuple[float, ...]
    param_sha256: str | None  # equal hashes: the same training result
    wall_time_s: float
    final_val_accuracy: float | None  # classifiers only
    ledger: dict[str, Any]
    network: dict[str, Any] | None

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.task, self.optimizer, self.backend, self.world_size, self.settings)

    def val_points(self) -> list[tuple[int, float, int, float]]:
        """(step, val loss, bytes sent so far, training seconds so far) at each evaluation."""
        sent = [0, *accumulate(self.step_bytes_sent)]
        secs = [0.0, *accumulate(self.step_time_s)]
        out = []
        for step, loss in self.val_loss:
            i = min(step, len(sent) - 1)  # step 0: before any communication
            out.append((step, loss, sent[i], secs[i]))
        return out


def _report_paths(arg: str) -> list[Path]:
    path = Path(arg)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ReportError(f"{arg}: no such file or directory (expected a run directory or its {REPORT})")
    found = []
    for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        if REPORT in files:  # a run: its checkpoints below may carry copies of its report
            found.append(Path(folder) / REPORT)
            subfolders.clear()
    if not found:
        raise ReportError(f"{arg}: no {REPORT} in this directory or below it (expected a run's --out)")
    return found


def _number(path: Path, name: str, value: Any) -> float:
    try:  # NaN and inf are numbers here: a diverged run still has a report
        check_number(f"field {name!r}", value, finite=False)
    except ValueError as err:
        raise ReportError(f"{path}: {err}") from None
    return float(value)


def _pairs(path: Path, name: str, value: Any) -> list[tuple[int, float]]:
    ok = isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value)
    if not ok:
        raise ReportError(f"{path}: field {name!r} must be a list of [step, value] pairs")
    return [(int(_number(path, name, a)), _number(path, name, b)) for a, b in value]


def _accuracy(path: Path, value: Any) -> float | None:
    return None if value is None else _number(path, "final_val_accuracy", value)


def read_run(path: Path) -> Run:
    """One report.json; raises ReportError naming the path and what is missing or wrong."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read it: {e}") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not JSON ({e}); expected a dlion report.json") from e
    if not isinstance(report, dict):
        raise ReportError(f"{path}: not a dlion report (a JSON object with {', '.join(REQUIRED)})")
    missing = [k for k in REQUIRED if k not in report]
    cfg, ledger = report.get("config"), report.get("ledger")
    if not missing and isinstance(cfg, dict) and isinstance(ledger, dict):
        missing = [f"config.{k}" for k in ("optimizer", "world_size") if k not in cfg]
        missing += [f"ledger.{k}" for k in LEDGER_KEYS if k not in ledger]
    if missing:
        raise ReportError(
            f"{path}: not a dlion report: missing {', '.join(missing)} "
            f"(expected the report.json of dlion train; it has {', '.join(REQUIRED)})"
        )
    if not isinstance(cfg, dict) or not isinstance(ledger, dict):
        raise ReportError(f"{path}: fields 'config' and 'ledger' must be JSON objects")
    if "dist_backend" not in cfg and cfg.get("backend") in ("gloo", "nccl"):
        # Reports from before the vote backends: "backend" was the process group's, and every
        # vote ran on all-gathered bits.
        cfg = {**cfg, "backend": "allgather", "dist_backend": cfg["backend"]}
    optimizer = str(cfg["optimizer"])
    backend = str(cfg.get("backend", "allgather")) if optimizer in BACKEND_USERS else "-"
    rest = {
        k: v for k, v in cfg.items() if k not in RUN_LOCAL | {"task", "optimizer", "backend", "world_size"}
    }
    if backend != "server":
        rest.pop("server", None)  # where a server runs matters only when there is one
    network = report.get("network")
    if isinstance(network, dict):
        rest["network"] = f"{network.get('hosts')}x{network.get('procs_per_host')}@{network.get('rate')}"
    steps = report["step_time_s"]
    if not isinstance(steps, list):
        raise ReportError(f"{path}: field 'step_time_s' must be a list of seconds per step")
    return Run(
        path=path,
        task=str(cfg.get("task", "bytes")),  # reports from before tasks trained bytes
        optimizer=optimizer,
        backend=backend,
        world_size=int(_number(path, "config.world_size", cfg["world_size"])),
        seed=int(_number(path, "config.seed", cfg.get("seed", 0))),
        settings=tuple(sorted((k, json.dumps(v)) for k, v in rest.items())),
        val_loss=tuple(_pairs(path, "val_loss", report["val_loss"])),
        final_val_loss=_number(path, "final_val_loss", report["final_val_loss"]),
        step_bytes_sent=tuple(int(s) for s, _ in _pairs(path, "step_bytes", report["step_bytes"])),
        step_time_s=tuple(_number(path, "step_time_s", t) for t in steps),
        param_sha256=report.get("param_sha256"),
        wall_time_s=_number(path, "wall_time_s", report["wall_time_s"]),
        final_val_accuracy=_accuracy(path, report.get("final_val_accuracy")),
        ledger=ledger,
        network=network if isinstance(network, dict) else None,
    )


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Runs from directories or report.json files, each file once, in the order given."""
    found: dict[Path, None] = {}
    for arg in paths:
        for p in _report_paths(str(arg)):
            found.setdefault(p.resolve(), None)
    if not found:
        raise ReportError(f"no runs given: expected one or more run directories or {REPORT} files")
    return [read_run(p) for p in found]


@dataclass(frozen=True)
class Group:
    """Runs with one configuration; ``extras`` are the settings that tell it from other groups."""

    runs: tuple[Run, ...]
    extras: tuple[tuple[str, str], ...]  # (name, value as shown)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def label(self) -> str:
        r = self.first
        parts = [r.optimizer, *([r.backend] if r.backend != "-" else []), f"w{r.world_size}"]
        return " ".join(parts + [f"{k}={v}" for k, v in self.extras])


def _show(text: str | None) -> str:
    """A setting's JSON text as a person writes it: strings without their quotes."""
    value = "-" if text is None else json.loads(text)
    return value if isinstance(value, str) else str(text)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """One group per configuration, in order of first appearance; seeds pooled. A group's
    extras are the settings in which it differs from groups of the same task, optimizer,
    backend and world size: what its label needs to tell them apart, and no more.

    A run whose param_sha256 equals an earlier one's in its group is that run again (a
    checkpoint's copy of the report, or another launcher's identical run) and is left out,
    so that it does not count as a second seed."""
    by_key: dict[tuple[Any, ...], list[Run]] = {}
    for r in runs:
        same = by_key.setdefault(r.key, [])
        if r.param_sha256 is None or all(r.param_sha256 != o.param_sha256 for o in same):
            same.append(r)
    groups = []
    for key, rs in by_key.items():
        kin = [dict(k[-1]) for k in by_key if k[:-1] == key[:-1]]
        differ = sorted({n for s in kin for n in s if len({t.get(n) for t in kin}) > 1})
        mine = dict(key[-1])
        groups.append(Group(tuple(rs), tuple((n, _show(mine.get(n))) for n in differ)))
    return groups

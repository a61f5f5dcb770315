"""bench.local_study: its plan (rows, grids, run order, virtual workers) and a --small run whose
table is checked against the runs' own reports."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.local_study import ROW_NAMES, STUDY_FLAGS, TRAIN_TAIL, Plan, command
from dlion.ledger import fp32_ring_bits_per_param


def _plan(tmp_path: Path, **kw: Any) -> Plan:
    base: dict[str, Any] = {
        "rows": ROW_NAMES,
        "workers": (4, 8),
        "seeds": (0,),
        "local_grid": (0.25, 0.5, 1.0),
        "diloco_grid": (0.5, 0.7, 1.0),
        "out": tmp_path,
    }
    return Plan(**{**base, **kw})


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_plan_runs_the_deciding_cells_first_with_their_grids(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    cells = plan.cells()
    # 5 rows without an outer step, 2 DiLoCo rows and 6 dlion-local rows at 3 outer lrs, 2 worker counts.
    assert len(cells) == 2 * (5 + 2 * 3 + 6 * 3)
    head = [(c.row.name, c.workers, c.outer_lr) for c in cells[:16]]
    assert head[:4] == [("adamw-global", 4, None), ("adamw-global", 8, None),
                        ("dlion-mavo", 4, None), ("dlion-mavo", 8, None)]  # fmt: skip
    assert head[4:10] == [("dlion-local-h16", w, lr) for w in (4, 8) for lr in (4.0, 8.0, 16.0)]
    assert head[10:16] == [("diloco-h16", w, lr) for w in (4, 8) for lr in (0.5, 0.7, 1.0)]
    assert {c.steps for c in cells if c.workers == 4} == {2000}
    assert {c.steps for c in cells if c.workers == 8} == {1000}  # the same bytes at either count
    ef = next(c for c in cells if c.row.name == "dlion-local-h64-ef" and c.outer_lr == 32 and c.workers == 8)
    argv = command(plan, ef)
    assert _flag(argv, "--local-steps") == "64" and _flag(argv, "--outer-lr") == "32"
    assert "--error-feedback" in argv and _flag(argv, "--virtual-workers") == "8"
    assert _flag(argv, "--sampling") == "stream" and _flag(argv, "--steps") == "1000"
    assert _flag(argv, "--out") == str(tmp_path / "runs" / "w8" / "dlion-local-h64-ef-lr32-s0")
    assert all(flag in argv for flag in STUDY_FLAGS)
    psgd = next(c for c in cells if c.row.name == "powersgd-r1" and c.workers == 8)
    argv = command(plan, psgd)
    assert "--virtual-workers" not in argv and _flag(argv, "--workers") == "8"  # DDP needs processes
    assert _flag(argv, "--powersgd-rank") == "1" and "--outer-lr" not in argv
    adamw = command(plan, cells[0])
    assert "--local-steps" not in adamw and "--backend" not in adamw


def test_bad_plans_are_refused_naming_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"rows must be a non-empty list of .*; got \['lion'\]"):
        _plan(tmp_path, rows=("lion",))
    with pytest.raises(ValueError, match=r"local_grid must be a non-empty list of numbers > 0, got \[0\.0\]"):
        _plan(tmp_path, local_grid=(0.0,))
    with pytest.raises(ValueError, match="rank_steps=6 gives no step at 8 workers"):
        _plan(tmp_path, rank_steps=6)


def _small(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench.local_study", "--small", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def _check_rows_against_reports(out: Path, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        name = row["row"] + ("" if row["outer_lr"] is None else f"-lr{row['outer_lr']:g}")
        report = json.loads((out / "runs" / f"w{row['workers']}" / f"{name}-s0" / "report.json").read_text())
        assert report["config"]["optimizer"] == row["optimizer"]
        assert report["config"]["world_size"] == row["workers"]
        assert bool(report["config"]["virtual_workers"]) == row["virtual"]
        assert row["final_val_loss"] == report["final_val_loss"] == report["val_loss"][-1][1]
        train = statistics.fmean(report["train_loss"][-TRAIN_TAIL:])
        assert row["final_train_loss"] == pytest.approx(train, abs=1e-12)
        assert row["gap"] == pytest.approx(report["final_val_loss"] - train, abs=1e-12)
        assert row["bits_per_param_up"] == report["ledger"]["bits_per_param_up"]
        assert row["bits_per_param_down"] == report["ledger"]["bits_per_param_down"]
        assert row["fewer_than_fp32"] == report["saving"]["fewer_than_fp32"]
        assert row["fp32_allreduce_bits_per_param"] == fp32_ring_bits_per_param(row["workers"])
        corpus = report["corpus"]
        assert corpus["sampling"] == "stream" and row["epochs"] == corpus["epochs"] < 1


def test_small_study_runs_resumes_and_tabulates_its_reports(tmp_path: Path) -> None:
    """CI's short version: 2 worker processes; the virtual cells run under -m slow below."""
    flags = ("--rows", "adamw-global,dlion-mavo", "--workers", "2")
    first = _small(tmp_path, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads((tmp_path / "study.json").read_text())
    assert [(r["row"], r["workers"], r["virtual"]) for r in rows] == [
        ("adamw-global", 2, False), ("dlion-mavo", 2, False),
    ]  # fmt: skip
    _check_rows_against_reports(tmp_path, rows)
    mavo = rows[1]
    assert mavo["bits_per_param_up"] < 1.1 and rows[0]["bits_per_param_up"] > 31  # 1-bit vote vs fp32
    table = (tmp_path / "study.md").read_text()
    assert f"| dlion-mavo | 2 | - | - | 0 | {mavo['final_val_loss']:.4f} |" in table
    assert f"{mavo['gap']:+.4f}" in table and f"{mavo['fewer_than_fp32']:.1f}" in table
    assert (tmp_path / "loss_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "w2" / "report.md").is_file()
    # Every cell has its report: nothing runs again and the table is the same.
    again = _small(tmp_path, *flags)
    assert again.returncode == 0 and "[1/2]" not in again.stdout, again.stderr[-3000:]
    assert json.loads((tmp_path / "study.json").read_text()) == rows


@pytest.mark.slow
def test_small_study_with_virtual_workers(tmp_path: Path) -> None:
    proc = _small(tmp_path, "--rows", "dlion-mavo", "--workers", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "study.json").read_text())
    assert [(r["row"], r["workers"], r["virtual"]) for r in rows] == [("dlion-mavo", 3, True)]
    _check_rows_against_reports(tmp_path, rows)


@pytest.mark.slow
def test_small_study_of_the_local_step_rows(tmp_path: Path) -> None:
    rows_ = "dlion-local-h4,dlion-local-h4-ef,diloco-h16"
    proc = _small(tmp_path, "--rows", rows_, "--workers", "2", "--steps", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "study.json").read_text())
    assert [(r["row"], r["outer_lr"]) for r in rows] == [
        ("diloco-h16", 0.7), ("dlion-local-h4", 2.0), ("dlion-local-h4-ef", 2.0)
    ]  # fmt: skip
    _check_rows_against_reports(tmp_path, rows)
    for r in rows[1:]:  # one vote of 1 bit each way every 4 steps
        assert r["bits_per_param_up"] < 0.3 and r["local_steps"] == 4

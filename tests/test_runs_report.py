"""``dlion report``: synthetic reports in, grouped numbers, the table, plots and errors out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dlion.report.cli import main
from dlion.report.plots import curve
from dlion.report.runs import ReportError, group_runs, load_runs
from dlion.report.table import markdown_table, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_BYTES = [[120, 130], [100, 100], [100, 100], [100, 100]]  # the first step carries a fingerprint
NETWORK = {
    "hosts": 2,
    "procs_per_host": 1,
    "rate": "1gbit",
    "totals": {"interface_tx_bytes": 3_000_000, "ledger_bytes_sent": 2_400_000, "tx_over_ledger_sent": 1.25},
}


def _bits(bits: float) -> dict[str, float]:
    return {"bits_per_param_up": bits, "bits_per_param_down": bits}


def make_report(optimizer: str, seed: int, final: float, **config: Any) -> dict[str, Any]:
    """A report with dlion.train.report's layout: 4 steps, validation at 0, 2 and 4."""
    bits = 48.0 if optimizer.endswith("global") else 1.0
    losses = [5.0, final + 1.0, final]
    return {
        "config": {
            "optimizer": optimizer,
            "backend": "allgather",
            "steps": 4,
            "lr": 5e-4,
            "seed": seed,
            "world_size": 2,
            "dist_backend": "gloo",
            "torch_version": "x",
            "out": f"runs/{optimizer}-{seed}",
            **config,
        },
        "n_params": 1000,
        "val_loss": [[s, v] for s, v in zip((0, 2, 4), losses, strict=True)],
        "final_val_loss": final,
        "step_bytes": STEP_BYTES,
        "ledger": {"steps": 4, "bytes_sent": 420, "bytes_received": 430, **_bits(bits)},
        "step_time_s": [0.5, 0.25 + 0.25 * seed, 0.5, 0.5],
        "step_time_s_mean": 0.5,
        "eval_time_s": 0.3,
        "wall_time_s": 10.0 + seed,
    }


def write(root: Path, name: str, report: Any) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.fixture
def run_dirs(tmp_path: Path) -> list[Path]:
    """2 optimizers x 2 seeds, and one emulated-cluster run with the sharded vote."""
    return [
        write(tmp_path, "mavo-0", make_report("dlion-mavo", 0, 2.0)),
        write(tmp_path, "adamw-0", make_report("adamw-global", 0, 1.5)),
        write(tmp_path, "mavo-1", make_report("dlion-mavo", 1, 2.4)),
        write(tmp_path, "adamw-1", make_report("adamw-global", 1, 1.7, backend="sharded")),
        write(tmp_path, "net", make_report("dlion-mavo", 0, 2.1, backend="sharded") | {"network": NETWORK}),
    ]


def test_runs_differing_only_in_seed_are_one_row(run_dirs: list[Path]) -> None:
    groups = group_runs(load_runs(run_dirs))
    # adamw-global all-reduces: its backend flag is unused, so its two runs are pooled too.
    assert [g.label for g in groups] == [
        "dlion-mavo allgather w2",
        "adamw-global w2",
        "dlion-mavo sharded w2",
    ]
    assert [[r.seed for r in g.runs] for g in groups] == [[0, 1], [0, 1], [0]]
    mavo, adamw, net = (summarize(g) for g in groups)
    loss = mavo["final_val_loss"]
    assert loss["mean"] == pytest.approx(2.2) and (loss["min"], loss["max"]) == (2.0, 2.4)
    assert loss["std"] == pytest.approx(math.sqrt(0.08))  # sample std of 2.0 and 2.4
    assert adamw["final_val_loss"]["mean"] == pytest.approx(1.6) and adamw["bits_per_param_up"] == 48.0
    assert mavo["wall_time_s"] == 10.5 and mavo["step_time_s_mean"] == pytest.approx((0.4375 + 0.5) / 2)
    assert mavo["mb_sent_per_worker"] == pytest.approx(420e-6) and mavo["steps"] == 4
    assert mavo["network"] is None
    assert net["network"] == {"interface_tx_mb_per_host": 1.5, "interface_over_ledger_sent": 1.25}
    assert net["final_val_loss"] == {"mean": 2.1, "std": 0.0, "min": 2.1, "max": 2.1}


def test_bytes_and_time_at_each_validation_step(run_dirs: list[Path]) -> None:
    run = load_runs(run_dirs[:1])[0]
    # step 0 is before any communication; step 2 follows steps 1 and 2.
    assert run.val_points() == [(0, 5.0, 0, 0.0), (2, 3.0, 220, 0.75), (4, 2.0, 420, 1.75)]
    c = curve(group_runs(load_runs(run_dirs[:3]))[0])
    assert c.steps == [0, 2, 4] and c.seeds == 2
    assert c.loss_mean == pytest.approx([5.0, 3.2, 2.2])
    assert (c.loss_min, c.loss_max) == ([5.0, 3.0, 2.0], [5.0, 3.4, 2.4])
    assert c.bytes_sent == [0, 220, 420] and c.train_s == pytest.approx([0.0, 0.875, 1.875])


def test_a_run_is_counted_once(tmp_path: Path) -> None:
    """A checkpoint's copy of a report, below the run, is not read; an identical run elsewhere
    (equal param_sha256) is not a second seed; runs with other hashes are."""
    hashed = make_report("dlion-mavo", 0, 2.0) | {"param_sha256": "ab"}
    run = write(tmp_path, "hashed", hashed)
    write(run, "checkpoint_000004", hashed | {"final_val_loss": 9.0})
    write(tmp_path, "torchrun", hashed)
    write(tmp_path, "other", hashed | {"param_sha256": "cd", "final_val_loss": 3.0})
    runs = load_runs([tmp_path])
    assert [r.path.parent.name for r in runs] == ["hashed", "other", "torchrun"]
    (group,) = group_runs(runs)
    assert [r.path.parent.name for r in group.runs] == ["hashed", "other"]
    assert summarize(group)["final_val_loss"]["mean"] == 2.5


def test_labels_name_only_the_settings_that_tell_groups_apart(tmp_path: Path) -> None:
    runs = load_runs(
        [
            write(tmp_path, "a", make_report("dlion-mavo", 0, 2.0)),
            write(tmp_path, "b", make_report("dlion-mavo", 0, 2.0, lr=1e-3)),
            write(tmp_path, "c", make_report("adamw-global", 0, 2.0, lr=2e-3)),
            write(tmp_path, "d", make_report("dlion-avg", 0, 2.0, server="dedicated")),  # no server backend
        ]
    )
    labels = [g.label for g in group_runs(runs)]
    mavo = ["dlion-mavo allgather w2 lr=0.0005", "dlion-mavo allgather w2 lr=0.001"]
    assert labels == [*mavo, "adamw-global w2", "dlion-avg allgather w2"]
    table = markdown_table([summarize(g) for g in group_runs(runs)])
    assert "| settings |" in table and "| lr=0.001 |" in table


def test_markdown_table(run_dirs: list[Path]) -> None:
    table = markdown_table([summarize(g) for g in group_runs(load_runs(run_dirs))])
    lines = table.splitlines()
    assert lines[0] == (
        "| optimizer | backend | workers | runs (seeds) | steps | final val loss | min-max "
        "| bits/param/step up | down | fp32 all-reduce | x fewer | MB sent/worker | s/step | wall s "
        "| iface MB sent/host | iface/ledger |"
    )
    assert lines[2] == (
        "| dlion-mavo | allgather | 2 | 2 (0, 1) | 4 | 2.2000 | 2.0000 to 2.4000 | 1.0000 | 1.0000 "
        "| 32.0 | 32.0 | 0.00042 | 0.469 | 10.5 | - | - |"
    )
    # fp32 all-reduce at N = 2 is 32 bits each way: the fp32 baseline's 48 bits are 0.7x "fewer".
    assert lines[3].startswith(
        "| adamw-global | - | 2 | 2 (0, 1) | 4 | 1.6000 | 1.5000 to 1.7000 | 48.0000 |"
    )
    assert "| 32.0 | 0.7 |" in lines[3]
    assert lines[4].startswith("| dlion-mavo | sharded | 2 | 1 (0) | 4 | 2.1000 | - |")
    assert lines[4].endswith("| 1.50 | 1.250 |")
    assert "min-max" in lines[-1] and "rank 0's ledger" in lines[-1]
    plain = markdown_table([summarize(g) for g in group_runs(load_runs(run_dirs[:2]))])
    assert "iface" not in plain.splitlines()[0] and "settings" not in plain


def test_cli_writes_table_summary_and_plots(
    run_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # A single process sends nothing, which a log axis of bytes cannot show: it is named instead.
    write(tmp_path, "lion", make_report("lion", 0, 2.0, world_size=1) | {"step_bytes": [[0, 0]] * 4})
    # A folder of runs, one run given twice (once as its report.json): each read once.
    assert main([str(run_dirs[0].parent), str(run_dirs[0] / "report.json"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "| dlion-mavo | allgather | 2 | 2 (0, 1) |" in printed and "4 configurations from 6 runs" in printed
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spread"] == "min-max over seeds"
    assert [r["label"] for r in summary["rows"]] == [
        "adamw-global w2", "lion w1", "dlion-mavo allgather w2", "dlion-mavo sharded w2"]  # fmt: skip
    assert summary["rows"][2]["final_val_loss"]["mean"] == pytest.approx(2.2)
    md = (out / "report.md").read_text()
    names = ["val_loss_vs_step.png", "val_loss_vs_bytes.png", "val_loss_vs_time.png", "bits_per_param.png"]
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
        assert f"({name})" in md
    assert "| adamw-global | - | 2 | 2 (0, 1) |" in md


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file or directory (expected a run directory or its report.json)"),
        ("", "no report.json in this directory or below it"),
        ("{not json", "not JSON"),
        ([1, 2], "not a dlion report"),
        ({"config": {}}, "not a dlion report: missing val_loss, final_val_loss, step_bytes, ledger"),
        ({k: v for k, v in make_report("dlion-mavo", 0, 2.0).items() if k != "ledger"}, "missing ledger"),
        (make_report("dlion-mavo", 0, 2.0) | {"val_loss": [5.0]}, "'val_loss' must be a list of [step,"),
        (make_report("dlion-mavo", 0, 2.0) | {"wall_time_s": "1s"}, "'wall_time_s' must be a number"),
    ],
)
def test_bad_input_is_one_line_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, expected: str
) -> None:
    path = tmp_path / "run"
    if content is not None:
        path.mkdir()
        if content != "":
            text = content if isinstance(content, str) else json.dumps(content)
            (path / "report.json").write_text(text)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dlion report: error: ") and str(path) in err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_no_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReportError, match="no runs given"):
        load_runs([])
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2 and "RUN_DIR" in capsys.readouterr().err


def test_bits_chart_draws_the_fp32_reference_inside_the_figure(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dlion.report.plots import bits_figure

    # One process first: it has no fp32 reference, and the legend must still name it.
    write(tmp_path, "lion", make_report("lion", 0, 2.0, world_size=1) | {"step_bytes": [[0, 0]] * 4})
    write(tmp_path, "mavo", make_report("dlion-mavo", 0, 2.0, world_size=4))
    fig = bits_figure(plt, group_runs(load_runs([tmp_path])))
    ax = fig.axes[0]
    fig.canvas.draw()
    whole = fig.bbox
    title = ax.title.get_window_extent()
    assert whole.x0 <= title.x0 and title.x1 <= whole.x1 and title.y1 <= whole.y1  # not cut off
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "fp32 all-reduce, same N" in legend and ax.get_yscale() == "log"
    # The reference at N = 4: 2 (N-1)/N x 32 = 48 bits each way.
    assert [c.get_segments()[0][0][1] for c in ax.collections if c.get_label().startswith("fp32")] == [48.0]
    plt.close(fig)


def test_help_names_the_command_users_type(capsys: pytest.CaptureFixture[str]) -> None:
    from dlion.cli import main as dlion_main

    with pytest.raises(SystemExit) as exit_info:
        dlion_main(["report", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: dlion report ")


def test_a_classifier_shows_its_task_and_accuracy(run_dirs: list[Path], tmp_path: Path) -> None:
    digits = make_report("dlion-mavo", 0, 0.3, task="digits") | {"final_val_accuracy": 0.9}
    runs = load_runs([run_dirs[0], write(tmp_path, "digits", digits)])
    rows = [summarize(g) for g in group_runs(runs)]
    assert [(r["task"], r["final_val_accuracy"]) for r in rows] == [("bytes", None), ("digits", 0.9)]
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| task | optimizer |") and "| val accuracy |" in lines[0]
    assert lines[3].startswith("| digits | dlion-mavo | allgather | 2 | 1 (0) | 4 | 0.3000 | - | 0.9000 |")
    assert "cross-entropy, nats" in lines[-1] and "per byte" not in lines[-1]


def test_reports_from_before_the_vote_backends(tmp_path: Path) -> None:
    """Then ``backend`` named the process group's backend, and every vote all-gathered."""
    report = make_report("dlion-mavo", 0, 2.0, backend="gloo")
    del report["config"]["dist_backend"]
    assert group_runs(load_runs([write(tmp_path, "old", report)]))[0].label == "dlion-mavo allgather w2"
